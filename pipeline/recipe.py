"""The recipe: one typed, frozen, strict description of a fine-tuning job.

A recipe is YAML. It may inherit from another recipe with ``extends: other.yaml`` (a path relative to
the recipe that says it) and be adjusted from the command line with ``--set section.key=value``. All three
sources are merged first and validated once, so an override gets exactly the checks a file does.

Every problem is collected and reported together, each with the file that set the value, the dotted path,
what was expected, and a "did you mean" for near-miss keys::

    recipes/x.yaml: lora.alpah: unknown key (did you mean 'alpha'?)

This module is a leaf: it imports only pydantic, yaml and the standard library, so ``--help``,
``validate`` and ``plan`` stay fast on a machine without a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.egress import redact_secrets
from pipeline.errors import UsageError
from pipeline.schema_errors import format_validation_errors
from pipeline.taskspec import TaskSection

RECIPE_KEYS_ALLOWED_OUTSIDE_SCHEMA = ("extends",)


class RecipeError(UsageError):
    """A recipe (or an override) is wrong. ``errors`` holds one readable line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))

    def lines(self) -> list[str]:
        """One ``error:`` line per problem."""
        return list(self.errors)


class _Section(BaseModel):
    """Every section rejects unknown keys and cannot be changed after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """The base model."""

    path: str = Field(
        description="Local directory of the base model, or a Hugging Face model id looked up in the local "
        "cache (HF_HOME) with no network access. Weights are never downloaded."
    )
    revision: str | None = Field(
        default=None,
        description="Commit the base must come from. For a model id: the cached commit (the newest cached one "
        "if unset). For a local directory: checked against the Hugging Face cache snapshot it is, or the "
        "per-file download records `hf download --local-dir` leaves; a mismatch, a file edited after download "
        "or a directory with no such record stops the run before any weight loads.",
    )
    license: str | None = Field(
        default=None,
        description="License of the base weights, an id from pipeline/licenses.yaml (llama3.3, apache-2.0, mit, "
        "gemma, qwen, ...). Unset: read from the base's README/LICENSE files when they name one.",
    )
    license_accepted: bool = Field(
        default=False,
        description="You have read the base license's obligations (train and export print them) and accept them. "
        "`export` refuses until this is true; the acknowledgment is recorded in the export report.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="Attention kernel (transformers' attn_implementation)."
    )
    init: Literal["pretrained", "random"] = Field(
        default="pretrained",
        description="'pretrained' loads the base's weights. 'random' builds the architecture from its config.json "
        "with random weights created directly in 4 bits, layer by layer, to measure memory and speed without "
        "downloading weights (scripts/gpu_probe.py); `train` refuses it.",
    )


class QuantizationSection(_Section):
    """How the frozen base is stored (bitsandbytes through transformers' BitsAndBytesConfig)."""

    load_in_4bit: bool = Field(
        default=True,
        description="Store the base in 4 bits (QLoRA). False trains plain LoRA on a 16-bit base.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type; NF4 is the QLoRA paper's choice for normal weights."
    )
    double_quant: bool = Field(
        default=True,
        description="Quantize the quantization constants too: 0.5 -> 0.127 bits per parameter (~3 GB on 65B).",
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Dtype the 4-bit weights are dequantized to for each matmul."
    )


class LoraSection(_Section):
    """The adapter (peft's LoraConfig)."""

    r: int = Field(
        default=16,
        gt=0,
        le=1024,
        description="Adapter rank. Higher: more capacity and memory; 8-64 is typical.",
    )
    alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description="Layers that get adapters: 'all-linear' (every linear layer but the output head, as the "
        "QLoRA paper recommends) or a list of module names such as [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full next to the adapters, e.g. [embed_tokens] for a new vocabulary.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


class DataSection(_Section):
    """Where the data is and which contract it must meet. Relative paths are relative to the working directory."""

    contract: str = Field(description="Data contract (YAML) the rows are checked against, e.g. data_contracts/x.yaml.")
    train: str = Field(description="Training split (JSON Lines).")
    eval: str = Field(description="Evaluation split (JSON Lines). Never trained on.")
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="'chat' renders prompts with the tokenizer's chat template, 'plain' with the task's own "
        "template, 'auto' uses the chat template when the tokenizer has one.",
    )


class TrainingSection(_Section):
    """Optimization (TRL's SFTConfig). Names follow transformers/TRL where the meaning is the same."""

    max_length: int = Field(default=2048, gt=8, description="Longest tokenized example (prompt + completion).")
    micro_batch_size: int = Field(default=1, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(default=16, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2.0e-4, gt=0, lt=1, description="Peak learning rate.")
    num_epochs: float = Field(default=2.0, gt=0, description="Passes over the training split.")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps; overrides num_epochs when set."
    )
    train_sampling_strategy: Literal["random", "group_by_length"] = Field(
        default="random",
        description="'random' shuffles freely; 'group_by_length' batches examples of similar length (less "
        "padding, ~30% faster on the demo, but batches correlate with length: demo micro-F1 0.72 -> 0.50).",
    )
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of the steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on trainable weights.")
    max_grad_norm: float = Field(default=0.3, gt=0, description="Gradient clipping norm (0.3 in the QLoRA paper).")
    optim: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"] = Field(
        default="paged_adamw_8bit",
        description="Optimizer. Paged 8-bit AdamW keeps states in 2 bytes per parameter and pages them to host "
        "memory under pressure; use adamw_torch on a CPU.",
    )
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute activations in backward (non-reentrant): far less memory, ~30% slower.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Mixed precision; 'auto' is bf16 where the GPU supports it, else fp16, fp32 on CPU.",
    )
    seed: int = Field(default=42, description="Seed for data order, adapter initialization and dropout.")
    logging_steps: int = Field(default=10, gt=0, description="Log loss, learning rate and grad norm every N steps.")
    save_steps: int = Field(default=200, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(
        default=2,
        ge=1,
        description="Sealed checkpoints kept on disk; the oldest is deleted only after the newest is sealed, so a "
        "crash at any moment leaves a complete one to resume from (1 is safe; 2 also survives a corrupted disk).",
    )
    # Sequence handling and loss (TRL's SFTConfig names).
    packing: bool = Field(
        default=False,
        description="Pack several examples into each max_length row (TRL's best-fit-decreasing packing). Examples "
        "keep their boundaries (position ids restart, so attention never crosses them); no padding tokens, "
        "fewer but fuller rows per step. An example longer than max_length is truncated, as without packing.",
    )
    completion_only_loss: bool = Field(
        default=True,
        description="Compute the loss on the completion (the answer) only, not on the prompt. False also trains "
        "the model to reproduce the prompts (notes), which rarely helps a task and costs nothing extra.",
    )


class HardwareSection(_Section):
    """The machine the recipe is written for."""

    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="'auto' trains on the GPU when CUDA is available, else on the CPU."
    )
    gpu_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory of one target GPU for the plan's fit check, read as GiB (2**30 bytes) like every "
        "figure the plan prints: nvidia-smi's MiB / 1024 (an A100 80GB has 81,920 MiB = 80 GiB).",
    )
    num_gpus: int = Field(
        default=1,
        gt=0,
        description="GPUs the effective batch is spread over. `train` starts one process per GPU (torchrun) when "
        "this is above 1; `train --num-processes N` overrides it.",
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="How several processes share the work. 'ddp': each GPU holds the whole 4-bit model and the "
        "gradients are averaged (the model must fit one GPU). 'fsdp': FSDP-QLoRA, the 4-bit weights are sharded "
        "across the GPUs (stored in the compute dtype so FSDP can flatten them) for a model that does not fit "
        "one GPU. Ignored with one process.",
    )


class EvalSection(_Section):
    """Evaluation on the eval split after training."""

    max_new_tokens: int = Field(
        default=64, gt=0, description="Generation budget per example; answers cut here are counted."
    )
    batch_size: int = Field(default=8, gt=0, description="Examples generated together (left-padded).")
    max_examples: int | None = Field(
        default=None,
        gt=0,
        description="Score only the first N accepted eval rows (quick checks); all if unset.",
    )
    systems: list[Literal["base", "finetuned", "baseline"]] = Field(
        default_factory=lambda: ["base", "finetuned"],
        description="Systems to score: 'base' (the adapter off), 'finetuned', and 'baseline' (the commercial "
        "model of the baseline section; it sends data only when baseline.send_data is true). If unset: base and "
        "finetuned, plus baseline when the recipe has a baseline section (skipped, with the reason in the report, "
        "while send_data is false).",
    )
    bootstrap_samples: int = Field(
        default=1000,
        ge=100,
        le=100_000,
        description="Paired bootstrap resamples for the 95% confidence interval of fine-tune minus baseline.",
    )


def refuse_url_credentials(url: str | None, instead: str) -> str | None:
    """Refuse a URL that carries a password or token: a recipe is saved in every run and logged to MLflow.

    ``https://bob:pw@host`` and ``https://host/v1?api_key=...`` are refused (the error shows the URL with the
    secret masked); a URL without credentials is returned unchanged.
    """
    if url and redact_secrets(url) != url:
        raise ValueError(
            "the URL holds a credential (a password or token); a recipe is written to "
            f"every run directory and logged to MLflow, so credentials never belong in it: remove it and {instead}"
        )
    return url


class TrackingSection(_Section):
    """MLflow tracking. Nothing is sent anywhere unless ``uri`` names a server."""

    enabled: bool = Field(default=True, description="Log the run to MLflow.")
    uri: str = Field(
        default="sqlite:///mlruns.db",
        description="MLflow tracking URI. The default is a SQLite file in the working directory, with artifacts "
        "in ./mlartifacts beside it. MLFLOW_TRACKING_URI in the environment wins over this value.",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; the recipe name if unset.")
    registered_model: str | None = Field(
        default=None,
        description="MLflow Model Registry name the adapter is registered under after training (the merged model "
        "from `export --merge --register` goes to export.model_name, or when that is unset to '<name>-merged' "
        "prefixed as the base license requires); the recipe name if unset.",
    )
    register_adapter: bool = Field(
        default=True, description="Register the trained adapter as a new version of registered_model."
    )

    @field_validator("uri")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        return refuse_url_credentials(
            value, "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )


class PrivacySection(_Section):
    """What may leave the machine. By default nothing: only loopback connections are allowed."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts this job may connect to besides loopback: names (mlflow.internal), IP addresses "
        "or networks (10.0.0.0/8). Typically the tracking server. Any other connection is refused before "
        "it is made.",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            name, slash, prefix = host.partition("/")
            if not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]+", name) or (slash and not prefix.isdigit()):
                raise ValueError(f"{host!r} is not a host name, IP address or network (drop any scheme or path)")
        return value


class RemoteModelSection(_Section):
    """A model behind an API, called through its official SDK: the baseline and the judge share these keys.

    The API key is read from the environment variable named by ``api_key_env``; a key never belongs in a
    recipe.
    """

    provider: Literal["openai", "anthropic"] = Field(
        description="'openai' (the OpenAI chat completions API, also Azure OpenAI, vLLM or any compatible "
        "gateway through base_url) or 'anthropic' (the Anthropic messages API)."
    )
    model: str = Field(description="Model name at the provider, e.g. gpt-4o or claude-sonnet-4-5.")
    base_url: str | None = Field(
        default=None,
        description="Endpoint URL; the provider's public API if unset (https://api.openai.com/v1, "
        "https://api.anthropic.com). Its host must be loopback or on privacy.allowed_hosts.",
    )
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key (default OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY). The key itself never appears in a recipe, log, param or artifact.",
    )
    price_input_per_1m: float | None = Field(
        default=None, ge=0, description="Price in $ per 1M input tokens (e.g. 2.50 for gpt-4o); cost unknown if unset."
    )
    price_output_per_1m: float | None = Field(
        default=None, ge=0, description="Price in $ per 1M output tokens (e.g. 10.00 for gpt-4o)."
    )
    max_concurrency: int = Field(default=4, ge=1, le=64, description="Requests in flight at once.")
    max_tokens: int = Field(default=256, gt=0, description="Most tokens the model may answer with.")
    temperature: float | None = Field(
        default=0.0,
        ge=0,
        le=2,
        description="Sampling temperature, 0 (greedy) like the fine-tune's evaluation; null sends none, for models "
        "that accept only their default (recent Claude and OpenAI reasoning models).",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Seconds one request may take before it is retried.")
    max_retries: int = Field(
        default=4, ge=0, le=20, description="Retries per example after a 429, a 5xx, a timeout or a malformed answer."
    )
    retry_budget: int = Field(
        default=200,
        ge=0,
        description="Retries allowed across the whole evaluation; once spent, a failed request is recorded as "
        "failed at once instead of retried.",
    )
    backoff_initial_s: float = Field(
        default=1.0, ge=0, description="Wait before the first retry; doubles each retry (with jitter)."
    )
    backoff_max_s: float = Field(default=30.0, ge=0, description="Longest wait between two retries.")

    @field_validator("base_url")
    @classmethod
    def _url_without_credentials(cls, value: str | None) -> str | None:
        return refuse_url_credentials(value, "put the key in the environment variable api_key_env names instead")

    @model_validator(mode="before")
    @classmethod
    def _hide_key_like_values(cls, data: Any) -> Any:
        # Someone may paste the key itself here. The error must not echo it (errors print the value).
        if isinstance(data, dict):
            value = data.get("api_key_env")
            if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                data = {**data, "api_key_env": "<hidden: not an environment variable name; put the key in one>"}
        return data


class BaselineSection(RemoteModelSection):
    """A commercial or remote model scored beside the fine-tune, through its official SDK.

    Nothing is sent unless ``send_data`` is true, and then only to a host that is loopback or on
    ``privacy.allowed_hosts``. Every answer is kept in a snapshot file; ``snapshot`` scores from one alone.
    """

    few_shot: int = Field(
        default=0,
        ge=0,
        le=32,
        description="Solved examples drawn from the train split (seeded) and sent before each eval row.",
    )
    send_data: bool = Field(
        default=False,
        description="Send eval rows (and few-shot train rows) to the provider. False: nothing is sent and the "
        "report says the baseline was skipped and why.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where answers are cached (one file per request hash); <run-dir>/baseline_cache if unset. "
        "A re-run sends nothing already answered.",
    )
    snapshot: str | None = Field(
        default=None,
        description="A baseline snapshot file (baseline_snapshot.jsonl of an earlier run) to score the baseline "
        "from alone: no key, no network, the same numbers as the live run. It must hold an answer for every eval "
        "row; otherwise the baseline is not scored and the report says how many rows are missing. Unset: the "
        "baseline is asked live and every answer is added to <run-dir>/baseline_snapshot.jsonl.",
    )


class JudgeSection(RemoteModelSection):
    """A pairwise judge: an LLM that picks the better of two systems' answers, each example in both orders.

    The documented default is a private judge: an OpenAI-compatible server on the team's own hosts (vLLM, a
    gateway), so ``base_url`` has no default; a commercial judge is an explicit choice of its URL. Egress as
    for the baseline: nothing is sent while ``send_data`` is false, only to loopback or privacy.allowed_hosts.
    """

    provider: Literal["openai", "anthropic"] = Field(
        default="openai",
        description="'openai' (chat completions: vLLM, a gateway or OpenAI; structured output through "
        "response_format) or 'anthropic' (the messages API; structured output through output_config).",
    )
    base_url: str = Field(  # type: ignore[assignment]
        description="Endpoint URL of the judge, e.g. http://judge.internal:8000/v1 (a vLLM server on your own "
        "hosts). Its host must be loopback or on privacy.allowed_hosts."
    )
    send_data: bool = Field(
        default=False,
        description="Send eval inputs, references and the two systems' answers to the judge. False: nothing is "
        "sent and the report says the judge was skipped and why.",
    )
    rubric: str | None = Field(
        default=None,
        description="Text added to the judge's instructions: what makes an answer better for this task.",
    )
    pairs: list[str] | None = Field(
        default=None,
        description="Pairs of systems to judge, each 'A vs B' with A and B among base, finetuned, baseline "
        "(e.g. ['finetuned vs baseline', 'finetuned vs base']). Unset: finetuned vs baseline, or finetuned vs "
        "base when the baseline has no answers in the evaluation.",
    )
    max_tokens: int = Field(default=512, gt=0, description="Most tokens the judge may answer with (its reason).")
    cache_dir: str | None = Field(
        default=None,
        description="Where judgements are cached (one file per request hash); <run-dir>/judge_cache if unset. A "
        "re-run sends nothing already judged.",
    )

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, value: list[str] | None) -> list[str] | None:
        systems = ("base", "finetuned", "baseline")
        for pair in value or []:
            a, _, b = pair.partition(" vs ")
            if a.strip() not in systems or b.strip() not in systems or a.strip() == b.strip():
                raise ValueError(f"{pair!r}: write 'A vs B' with two different systems among {', '.join(systems)}")
        return value


class CostSection(_Section):
    """Inputs of the cost-of-ownership comparison (self-hosted GPU versus the baseline's API)."""

    gpu_price_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="$ per hour for the GPU(s) serving the fine-tune, e.g. 2.69 (H100, marketplace) to 6.88 "
        "(hyperscaler). No self-hosted cost is computed if unset.",
    )
    throughput_tokens_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Tokens (prompt + answer) per second the target GPU serves; the throughput measured during "
        "evaluation on this machine if unset.",
    )
    hours_per_month: float = Field(
        default=730.0, gt=0, le=744, description="Hours a dedicated GPU is paid for a month."
    )


class ExportSection(_Section):
    """``python -m pipeline export``: adapter-only and merged exports, and the check of the merged weights."""

    merge_base: Literal["dequantized", "original"] = Field(
        default="dequantized",
        description="Weights the adapter is merged into: 'dequantized' = dequant(NF4(W)), the weights it was trained "
        "and evaluated against; 'original' = the base's 16-bit weights (closer to the base, further from what was "
        "evaluated). `export --merge-base` overrides it.",
    )
    min_next_token_agreement: float = Field(
        default=0.98,
        ge=0,
        le=1,
        description="Export fails (exit 1) when the merged model predicts the same next token as base-in-4-bit + "
        "adapter on fewer than this fraction of the verification positions.",
    )
    verify_examples: int = Field(
        default=16, gt=0, description="Eval rows the merged model is checked on (logits and the task metric)."
    )
    verify_max_cpu_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="CPU RAM (GiB) the merged model may take while `export --merge` verifies it; layers that fit "
        "neither the GPUs nor this budget stay on disk and are read when they run (slower, bounded). Unset: the "
        "merged model is loaded whole across GPUs and RAM (a 70B in bf16 needs 141 GB between them). The merge "
        "itself is always streamed.",
    )
    model_name: str | None = Field(
        default=None,
        description="Name of the exported model (model card title; registered name of the merged model from "
        "`export --merge --register`). Must begin with the prefix the base license requires (Llama 3.x: 'Llama'; "
        "spaces and hyphens count alike). Unset: the recipe name, prefixed as the license requires (card), and "
        "'<tracking.registered_model>-merged', prefixed likewise (registry).",
    )


class Recipe(_Section):
    """A whole fine-tuning job."""

    name: str = Field(description="Short name; runs go to runs/<name>/<run-id>/.")
    task: TaskSection = Field(
        description="What the model learns: a preset name (medical_coding, classification, extraction, summarization, "
        "chat) or a mapping that declares the prompt, target, answer type, parser and metrics (TaskSection)."
    )
    description: str | None = Field(default=None, description="One line for people reading the run.")
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    hardware: HardwareSection = Field(default_factory=HardwareSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    baseline: BaselineSection | None = Field(
        default=None,
        validate_default=True,
        description="A commercial model to compare with (see eval.systems); none if unset.",
    )
    judge: JudgeSection | None = Field(
        default=None,
        description="A pairwise judge of the systems' answers, run by train and evaluate; none if unset.",
    )
    cost: CostSection = Field(default_factory=CostSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @field_validator("baseline")
    @classmethod
    def _baseline_configured(cls, value: BaselineSection | None, info: ValidationInfo) -> BaselineSection | None:
        settings = info.data.get("eval")
        if value is None and settings is not None and "baseline" in settings.systems:
            raise ValueError("eval.systems lists 'baseline' but the recipe has no baseline section (add one)")
        if value is not None and _is_chat(info.data.get("task")):
            if value.provider == "anthropic":
                raise ValueError(
                    "provider anthropic cannot take OpenAI-format conversations with tool calls yet; use provider "
                    "openai (OpenAI, or any OpenAI-compatible endpoint through base_url)"
                )
            if value.few_shot:
                raise ValueError("few_shot does not apply to task chat: each conversation is sent as it is")
        return value

    @field_validator("data")
    @classmethod
    def _chat_needs_template(cls, value: DataSection, info: ValidationInfo) -> DataSection:
        if _is_chat(info.data.get("task")) and value.prompt_format == "plain":
            raise ValueError(
                "prompt_format: plain cannot render conversations; task chat goes through the base's chat template "
                "(prompt_format: chat or auto)"
            )
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError("use 1-64 letters, digits, '.', '_' or '-' (it names a directory)")
        return value

    def to_yaml(self) -> str:
        """The fully resolved recipe (extends and overrides applied, defaults filled in)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _is_chat(task: TaskSection | None) -> bool:
    return task is not None and task.is_chat


# --------------------------------------------------------------------------------------------------
# Loading: YAML -> merged dict (with provenance) -> Recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge and validate a recipe.

    Args:
        path: The recipe YAML.
        overrides: ``section.key=value`` strings; values are parsed as YAML (``8``, ``true``, ``[a, b]``).

    Returns:
        The validated, frozen recipe.

    Raises:
        RecipeError: With every problem found, each naming its file and dotted path.
    """
    path = Path(path)
    origin: dict[str, str] = {}
    raw = _read_with_extends(path, origin, chain=())
    errors: list[str] = []
    for override in overrides:
        try:
            dotted, value = _parse_override(override)
        except ValueError as exc:
            errors.append(f"--set {override}: {exc}")
            continue
        _set_dotted(raw, dotted, value)
        origin[dotted] = "--set"
    if errors:
        raise RecipeError(errors)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(
            format_validation_errors(
                exc, Recipe, origin, default_file=str(path), top_level_extras=RECIPE_KEYS_ALLOWED_OUTSIDE_SCHEMA
            )
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"{path}: file not found (working directory: {Path.cwd()})"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}: not valid YAML: {problem}"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}"])
    return data


def _read_with_extends(path: Path, origin: dict[str, str], chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError([f"{path}: extends: cycle ({cycle})"])
    data = _read_yaml(path)
    parent_ref = data.pop("extends", None)
    merged: dict[str, Any] = {}
    if parent_ref is not None:
        if not isinstance(parent_ref, str):
            raise RecipeError([f"{path}: extends: expected a path to another recipe, got {parent_ref!r}"])
        parent = (path.parent / parent_ref) if not Path(parent_ref).is_absolute() else Path(parent_ref)
        if not parent.is_file():
            raise RecipeError([f"{path}: extends: file not found: {parent}"])
        merged = _read_with_extends(parent, origin, (*chain, resolved))
    for dotted in _leaf_paths(data):
        origin[dotted] = str(path)
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge mappings key by key; any other value (lists included) replaces what the parent had."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        paths.append(dotted)
        if isinstance(value, dict):
            paths.extend(_leaf_paths(value, dotted + "."))
    return paths


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError("expected section.key=value")
    dotted, _, value_text = text.partition("=")
    dotted = dotted.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", dotted):
        raise ValueError(f"{dotted!r} is not a dotted key such as training.learning_rate")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text  # not YAML: keep the literal string and let the schema judge it
    return dotted, value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------------
# Checks that need the file system (kept out of the schema so recipes can be loaded anywhere)


def check_data_files(recipe: Recipe, source: str | Path) -> None:
    """Fail with every missing input file named at once.

    Args:
        recipe: A loaded recipe.
        source: The recipe file, for the error text.

    Raises:
        RecipeError: If the contract or a split file does not exist.
    """
    errors = []
    for key in ("contract", "train", "eval"):
        value = getattr(recipe.data, key)
        if not Path(value).is_file():
            errors.append(
                f"{source}: data.{key}: file not found: {value} (relative paths are resolved from the working "
                f"directory {Path.cwd()}; fix the path or pass --set data.{key}=PATH)"
            )
    if errors:
        raise RecipeError(errors)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys (``{"lora": {"r": 16}}`` -> ``{"lora.r": 16}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
