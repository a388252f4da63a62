"""``python -m pipeline export RUN [--merge]``: the adapter in PEFT format, merged weights, a model card.

The merge streams: it reads the base one safetensors shard at a time, and within a shard one tensor at a time,
adds ``scale * B @ A`` to the weights the adapter targets and writes the tensor straight into the output shard,
so peak memory is about the largest tensor plus the adapter, not the model (a Llama-3 70B's largest tensor, the
128,256 x 8,192 embedding, is 2.1 GB in bf16; the whole model is 141 GB). The shards are read and written by
``pipeline.weights`` (into fresh memory, not memory maps), so pages of a shard already merged never stay
resident; the model card is ``pipeline.card``.

Two merge bases:

- ``dequantized``: every linear layer that was 4-bit in training becomes dequant(NF4(W)) (bitsandbytes'
  ``quantize_4bit``/``dequantize_4bit`` with the recipe's quantization settings) before the update is added:
  exactly the weights the adapter was trained and evaluated against.
- ``original``: the update is added to the base's 16-bit weights. Closer to the base, but the adapter never saw
  those weights, so the result drifts from what was evaluated by the NF4 rounding error.

The output keeps each tensor's dtype from the base (no silent fp32 doubling). Then ``verify`` compares the
merged model with base-in-4-bit + adapter on eval prompts and the export fails below the recipe's agreement.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import rundir
from pipeline.card import model_card
from pipeline.errors import JobFailed
from pipeline.recipe import QuantizationSection, Recipe
from pipeline.serving import render_serving, serving_report
from pipeline.tasks import Task
from pipeline.weights import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ROW_CHUNK,
    Adapter,
    ExportInputError,
    ShardReader,
    base_shards,
    load_adapter,
    peak_rss_mb,
    release_freed_memory,
    write_shard,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
LICENSE_FILE_PREFIXES = ("LICENSE", "LICENCE", "USE_POLICY", "NOTICE")
FAILED_DIR = "failed-verification"  # where an export that failed verification is kept, inside OUT
STAGING_PREFIX = ".export-staging-"


class VerificationFailed(JobFailed):
    """The merged model does not behave like base-in-4-bit + adapter (exit code 1); ``report`` is the export's."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report

    def lines(self) -> list[str]:
        """The verification's numbers, under what failed."""
        return [f"export verification failed: {self}"]


# --------------------------------------------------------------------------------------------------
# The merge


def nf4_roundtrip(weight: Any, q: QuantizationSection) -> Any:
    """dequant(quant(W)) exactly as the 4-bit base saw it, in float32.

    transformers loads the base in ``compute_dtype`` and bitsandbytes quantizes that (blocks of 64, double
    quantization of the block scales when ``double_quant``), so the round trip starts from the same dtype.
    """
    import bitsandbytes.functional as bnbf
    import torch

    source = weight.to(getattr(torch, q.compute_dtype))
    packed, state = bnbf.quantize_4bit(
        source, blocksize=64, compress_statistics=q.double_quant, quant_type=q.quant_type, quant_storage=torch.uint8
    )
    return bnbf.dequantize_4bit(packed, state).float()


def lora_delta(a: Any, b: Any, scale: float, rows: slice) -> Any:
    """``scale * B[rows] @ A`` in float32: the update of those rows of the weight."""
    return (b[rows].float() @ a.float()) * scale


@dataclass
class Layout:
    """What the merge needs to know about the base architecture, from its config on the meta device."""

    quantized: set[str]  # weight names that were 4-bit (Linear4bit) in training
    input_embedding: str | None
    output_embedding: str | None
    tied: bool


def model_layout(model_dir: Path) -> Layout:
    """Build the base on the meta device (no memory) to find its linear layers and tied embeddings.

    Which linear layers bitsandbytes quantized is decided by transformers' own ``get_keys_to_not_convert``
    (the output head and tied weights stay 16-bit).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = set(get_keys_to_not_convert(model))
    quantized = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith(f".{s}") for s in skip)
    }
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    return Layout(
        quantized=quantized,
        input_embedding=f"{names[id(inp)]}.weight" if inp is not None else None,
        output_embedding=f"{names[id(out)]}.weight" if out is not None else None,
        tied=tied,
    )


def stream_merge(
    model_dir: str | Path,
    adapter: Adapter,
    out_dir: str | Path,
    merge_base: str,
    quantization: QuantizationSection,
    delta: Callable[[Any, Any, float, slice], Any] = lora_delta,
) -> dict[str, Any]:
    """Merge the adapter into the base one shard, and within it one tensor, at a time.

    Args:
        model_dir: The base model directory (safetensors).
        adapter: From ``load_adapter``.
        out_dir: Receives the merged shards (same names as the base's) and the index.
        merge_base: 'dequantized' (dequant(NF4(W))) or 'original' (the base's 16-bit weights).
        quantization: The recipe's quantization section (for the NF4 round trip).
        delta: The update function; a parameter so tests can inject a deliberately wrong merge.

    Returns:
        Counts for the export report: shards, tensors merged / replaced / round-tripped, dtypes, bytes, time.
    """
    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = model_layout(model_dir)
    shards = base_shards(model_dir)
    # A replaced input embedding on a tied base (the demo recipes train embed_tokens): the output head keeps the
    # base's frozen embedding, so the merged model stores both and is saved untied.
    untie = layout.tied and any(n in adapter.replaced for n in (layout.input_embedding, layout.output_embedding))
    pending_lora = set(adapter.lora)
    pending_replaced = set(adapter.replaced)
    weight_map: dict[str, str] = {}
    counts = {"merged": 0, "replaced": 0, "roundtripped": 0, "untied": untie}
    dtypes: dict[str, int] = {}
    total = 0
    started = time.time()
    for number, shard in enumerate(shards, start=1):
        fix = f"copy the base model ({model_dir}) again; it must be the one the adapter was trained on"
        with ShardReader(shard, "base model shard", fix) as reader:
            entries = [(n, reader.tensors[n]["dtype"], reader.tensors[n]["shape"]) for n in reader.keys()]
            sources = {n: n for n, _, _ in entries}
            if untie and layout.input_embedding in sources and layout.output_embedding not in sources:
                info = reader.tensors[layout.input_embedding]
                entries.append((layout.output_embedding, info["dtype"], info["shape"]))
                sources[layout.output_embedding] = layout.input_embedding  # the frozen original

            def produce(name: str, reader: ShardReader = reader, sources: dict[str, str] = sources) -> Any:
                original = reader.read(sources[name])
                if name != sources[name]:  # the untied output head: the base's embedding as it was
                    return original
                if name in adapter.replaced:
                    pending_replaced.discard(name)
                    counts["replaced"] += 1
                    new = adapter.replaced[name]
                    if list(new.shape) != list(original.shape):
                        raise ExportInputError(
                            f"adapter tensor {name} has shape {list(new.shape)}, the base {list(original.shape)}: "
                            "the adapter was trained on another base model"
                        )
                    return new.to(original.dtype)
                module = name.removesuffix(".weight")
                roundtrip = merge_base == "dequantized" and name in layout.quantized
                source = nf4_roundtrip(original, quantization) if roundtrip else original
                counts["roundtripped"] += roundtrip
                if module not in adapter.lora:
                    return source.to(original.dtype) if roundtrip else original
                pending_lora.discard(module)
                counts["merged"] += 1
                a, b = adapter.lora[module]
                if (b.shape[0], a.shape[1]) != tuple(original.shape):
                    raise ExportInputError(
                        f"adapter {module}: update is {b.shape[0]}x{a.shape[1]}, base weight {list(original.shape)}: "
                        "the adapter was trained on another base model"
                    )
                merged = torch.empty_like(original)
                for begin in range(0, original.shape[0], ROW_CHUNK):
                    rows = slice(begin, begin + ROW_CHUNK)
                    merged[rows] = (source[rows].float() + delta(a, b, adapter.scale, rows)).to(original.dtype)
                return merged

            total += write_shard(out_dir / shard.name, entries, produce, metadata=reader.metadata or None)
        for name, code, _ in entries:
            weight_map[name] = shard.name
            dtypes[code] = dtypes.get(code, 0) + 1
        release_freed_memory()
        print(f"  merged shard {number}/{len(shards)} {shard.name} ({time.time() - started:.0f}s)", flush=True)
    missing = sorted(pending_lora) + sorted(pending_replaced)
    if missing:
        raise ExportInputError(
            f"adapter modules not found in the base weights: {', '.join(missing[:5])}. Is model.path the base "
            "the adapter was trained on?"
        )
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        rundir.write_json(out_dir / "model.safetensors.index.json", index)
    return {
        **counts,
        "merge_base": merge_base,
        "shards": len(shards),
        "tensors": len(weight_map),
        "dtypes": dtypes,
        "bytes": total,
        "adapter_bytes": adapter.nbytes,
        "seconds": round(time.time() - started, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def write_model_files(model_dir: Path, tokenizer_dir: Path, out_dir: Path, untie: bool) -> dict[str, Any]:
    """config.json (untied if needed, no quantization), tokenizer, and a generation config with the right EOS.

    EOS ids are those the evaluation stopped on: the tokenizer's EOS and the base generation config's (Llama 3
    Instruct ends turns with <|eot_id|>, which only the generation config names).
    """
    from transformers import AutoTokenizer, GenerationConfig

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    rundir.write_json(out_dir / "config.json", config)
    source = tokenizer_dir if (tokenizer_dir / "tokenizer_config.json").is_file() else model_dir
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig()
    eos = generation.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation.eos_token_id = sorted(ids)[0] if len(ids) == 1 else sorted(ids)
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ids)
    generation.save_pretrained(out_dir)
    return {"eos_token_id": generation.eos_token_id, "pad_token_id": generation.pad_token_id}


# --------------------------------------------------------------------------------------------------
# Verification: the merged model against base-in-4-bit + adapter (what was evaluated)


def _greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]):
    """Per prompt: the greedy answer (its tokens up to and including the first EOS) and whether an EOS came.

    ``generation.greedy_decode``, the one decoding loop, one prompt per batch (no padding, so no padding can move a
    logit), the inputs on the model's first placed device, padded with the smallest EOS id, without progress lines.
    """
    from pipeline.generation import greedy_decode

    decoded = greedy_decode(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=1,
        eos_ids=eos_ids,
        device=_input_device(model),
        pad_token_id=min(eos_ids),
        progress=False,
    )
    return [(d.tokens, d.stopped) for d in decoded]


def _position_logits(model: Any, sequence: list[int], prompt_len: int) -> Any:
    """Logits (float32, CPU) at the positions that predict the tokens after the prompt."""
    import torch

    device = _input_device(model)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([sequence], device=device)).logits[0]
    return logits[prompt_len - 1 : len(sequence) - 1].float().cpu()


def _input_device(model: Any) -> Any:
    """Where a model's inputs go: its first placed device (an offloaded model's parameters sit on 'meta')."""
    placed = [d for d in (getattr(model, "hf_device_map", None) or {}).values() if d != "disk"]
    if placed:
        first = placed[0]
        return f"cuda:{first}" if isinstance(first, int) else first
    device = next(model.parameters()).device
    return "cpu" if device.type == "meta" else device


def merged_placement(recipe: Recipe, device: str, offload_dir: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments that place the merged model for verification within the recipe's RAM budget.

    Without ``export.verify_max_cpu_memory_gb`` the merged model is loaded like any model: on a GPU machine across
    the GPUs, the rest in CPU RAM; on a CPU machine all in RAM (a 70B in bf16: 141 GB). With it, accelerate fills
    the GPUs, then at most that much CPU RAM, and leaves the remaining layers on disk: their weights are read from
    the merged safetensors when the layer runs, so RAM holds the budget plus about one decoder layer, at the cost
    of reading those layers from disk on every forward pass. A Llama-3-70B layer: q and o 8,192 x 8,192, k and v
    8,192 x 1,024, three MLP matrices 8,192 x 28,672 = 856M parameters = 1.7 GB in bf16.
    """
    budget = recipe.export.verify_max_cpu_memory_gb
    if budget is None:
        return {"device_map": "auto" if device == "cuda" else {"": "cpu"}}
    from accelerate.utils import get_max_memory

    max_memory = get_max_memory()  # free memory of each GPU, and the available RAM
    max_memory["cpu"] = int(budget * 2**30)
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(offload_dir)}


def verify(
    recipe: Recipe,
    model_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    rows: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    task: Task,
) -> dict[str, Any]:
    """Compare the merged model with base-in-4-bit + adapter on eval prompts.

    The reference (4-bit base + adapter) generates greedily; both models are then run on the same prompt +
    reference answer, and the logits at every answer position compared: max and mean absolute difference, and
    the fraction of positions where the most likely next token is the same. Each model also answers on its own
    and the task metric is scored for both. The models are loaded one after the other, never both at once.

    Returns:
        The verification section of the export report (``passed`` against export.min_next_token_agreement).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.data import prompt_input_ids
    from pipeline.env import gather
    from pipeline.model import device_for, eos_token_ids, load_base, load_tokenizer

    device = device_for(recipe, gather())
    tokenizer = load_tokenizer(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_dir)
    prompts = [prompt_input_ids(tokenizer, ex) for ex in examples]
    budget = recipe.eval.max_new_tokens

    print(f"Verifying the merge on {len(prompts)} eval prompts: base in 4-bit + adapter (reference) ...", flush=True)
    reference = PeftModel.from_pretrained(load_base(recipe, model_dir, device), adapter_dir).eval()
    eos_ids = eos_token_ids(tokenizer, reference)
    ref_answers, ref_logits, sequences = [], [], []
    ref_decoded = _greedy_answers(reference, tokenizer, prompts, budget, eos_ids)
    for ids, (answer, stopped) in zip(prompts, ref_decoded, strict=True):
        sequence = ids + (answer or [min(eos_ids)])
        sequences.append(sequence)
        ref_logits.append(_position_logits(reference, sequence, len(ids)))
        ref_answers.append({"tokens": answer, "stopped": stopped})
    del reference
    _free(device)

    print("  ... and the merged model", flush=True)
    dtype = getattr(torch, recipe.quantization.compute_dtype)
    offload_dir = Path(tempfile.mkdtemp(prefix=".offload-", dir=merged_dir.parent))
    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=dtype, **merged_placement(recipe, device, offload_dir)
    ).eval()
    placement: dict[str, int] = {}
    for where in (getattr(merged, "hf_device_map", None) or {"": device}).values():
        placement[str(where)] = placement.get(str(where), 0) + 1
    max_diff, abs_sum, positions, agree = 0.0, 0.0, 0, 0
    merged_answers = []
    for ids, sequence, expected, (answer, stopped) in zip(
        prompts, sequences, ref_logits, _greedy_answers(merged, tokenizer, prompts, budget, eos_ids), strict=True
    ):
        got = _position_logits(merged, sequence, len(ids))
        diff = (got - expected).abs()
        max_diff = max(max_diff, float(diff.max()))
        abs_sum += float(diff.mean()) * diff.shape[0]
        positions += diff.shape[0]
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        merged_answers.append({"tokens": answer, "stopped": stopped})
    del merged
    _free(device)
    shutil.rmtree(offload_dir, ignore_errors=True)

    def score(answers: list[dict[str, Any]]) -> float:
        golds = [task.gold(row) for row in rows]
        texts = [
            tokenizer.decode([t for t in a["tokens"] if t not in eos_ids], skip_special_tokens=True) for a in answers
        ]
        return float(task.score(golds, [task.parse(t) for t in texts])[task.main_metric])

    agreement = agree / positions if positions else 0.0
    threshold = recipe.export.min_next_token_agreement
    ref_metric, merged_metric = score(ref_answers), score(merged_answers)
    same_answers = sum(a["tokens"] == b["tokens"] for a, b in zip(ref_answers, merged_answers, strict=True))
    return {
        "examples": len(prompts),
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": abs_sum / positions if positions else 0.0,
        "next_token_agreement": round(agreement, 6),
        "identical_answers": same_answers,
        "task_metric": task.main_metric,
        "task_metric_reference": round(ref_metric, 6),
        "task_metric_merged": round(merged_metric, 6),
        "min_next_token_agreement": threshold,
        "passed": agreement >= threshold,
        "merged_placement": placement,  # modules of the merged model per device ('disk': read when run)
        "max_cpu_memory_gb": recipe.export.verify_max_cpu_memory_gb,
    }


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The command


def _copy_license_files(model_dir: Path, out: Path) -> list[str]:
    copied = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name.upper().startswith(LICENSE_FILE_PREFIXES):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def export_run(
    run: str,
    *,
    merge: bool = False,
    out: str | Path | None = None,
    merge_base: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    register: bool = False,
    tracking_uri: str | None = None,
    allowed_hosts: tuple[str, ...] | list[str] = (),
    delta: Callable[[Any, Any, float, slice], Any] | None = None,
) -> dict[str, Any]:
    """Export a trained run: the adapter in PEFT format, and with ``merge`` the verified merged model.

    Everything is written into a staging directory inside ``out`` (``.export-staging-<random>``, same file
    system) and moved into place only once complete, so a crash or an error midway leaves the previous export
    in ``out`` as it was. An export whose merge fails verification publishes nothing in its place either: it is
    kept whole in ``out/failed-verification/`` (its merged model card says FAILED with the numbers) and is never
    registered.

    Args:
        run: Run directory or MLflow run id.
        merge: Also write merged weights (streamed) and verify them.
        out: Output directory (default ``<run_dir>/export``).
        merge_base: 'dequantized' or 'original' (default: the recipe's export.merge_base).
        overrides: ``--set`` values applied to the run's resolved recipe (e.g. model.license_accepted=true).
        register: Upload the merged model to the MLflow run and register it (only when it passed verification);
            requires ``merge`` (train already registered the adapter).
        tracking_uri: Store for an MLflow run id (default MLFLOW_TRACKING_URI, then sqlite:///mlruns.db).
        allowed_hosts: Hosts the user allowed for this command (``export --recipe`` / ``--allowed-host``): they stay
            allowed beside the run's own ``privacy.allowed_hosts`` once its recipe is loaded.
        delta: The LoRA update; ``lora_delta`` when None (tests inject a wrong one to see verification catch it).

    Returns:
        The export report (also written to ``export_report.json``), including ``license_acknowledgment``.

    Raises:
        ExportInputError: Missing or corrupt adapter/base files, or ``register`` without ``merge`` (exit 2).
        tracking.RunNotFound: ``run`` is neither a run directory nor a run id of the store (exit 2).
        egress.EgressBlocked: The store of a run id is not on the allow-list (exit 1).
        licenses.LicenseError: The license is not accepted or the name breaks it (exit 2).
        VerificationFailed: The merged model disagrees with the evaluated one (exit 1), after the report is written.
    """
    from pipeline import licenses
    from pipeline.egress import redact_secrets, update_allowed_hosts
    from pipeline.model import resolve_model_path
    from pipeline.recipe import load_recipe
    from pipeline.runlookup import resolve_run
    from pipeline.tracking import tracking_uri as recipe_tracking_uri

    if register and not merge:
        raise ExportInputError(
            "--register registers the merged model and needs --merge; the adapter was already registered by "
            "train (tracking.register_adapter). Add --merge, or drop --register for an adapter-only export."
        )
    # A run id is looked up (and, trained elsewhere, downloaded) in the store the user named.
    store = recipe_tracking_uri(explicit=tracking_uri)
    run_dir, mlflow_run_id = resolve_run(run, store, download_to=rundir.RUNS_ROOT / "_mlflow")
    recipe = load_recipe(run_dir / "recipe.resolved.yaml", overrides)
    # The run's tracking server (for the export's metrics, --register and the audit), and what the user allowed.
    update_allowed_hosts(tuple(dict.fromkeys([*allowed_hosts, *recipe.privacy.allowed_hosts])))
    model_dir = resolve_model_path(recipe.model.path, recipe.model.revision)
    lic, license_name, license_source = licenses.resolve(recipe.model.license, model_dir)
    print(licenses.render_obligations(lic, license_name, license_source))
    licenses.require_acceptance(
        recipe.model.license_accepted, lic, license_name, license_source, str(run_dir / "recipe.resolved.yaml")
    )
    model_name = licenses.derived_name(recipe.export.model_name, recipe.name, lic)
    ack = licenses.acknowledgment(lic, license_name, license_source, model_name)
    adapter_dir = run_dir / "adapter"
    adapter = load_adapter(adapter_dir)  # checks the files before anything is written
    out = Path(out) if out else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    stage = _new_staging_dir(out)
    try:
        report = _write_export(
            stage,
            out,
            recipe,
            run_dir,
            model_dir,
            adapter,
            adapter_dir,
            lic,
            license_name,
            ack,
            mlflow_run_id,
            merge=merge,
            base_kind=merge_base or recipe.export.merge_base,
            delta=delta,
        )
        verification = report.get("verification")
        passed = verification is None or verification["passed"]
        final = out if passed else out / FAILED_DIR
        _publish(stage, out, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already unless something failed before the publish
    print(f"Adapter (PEFT format) written to {report['adapter_dir']}")  # where it is now, not the staging copy

    # The same numbers (and the report) on the training run in MLflow; the merged model registered if it passed.
    if mlflow_run_id and recipe.tracking.enabled:
        uri = recipe_tracking_uri(recipe, explicit=tracking_uri)
        report["tracking_uri"] = redact_secrets(uri)
        tracking = _track_export(uri, mlflow_run_id, recipe, run_dir, report, final, register and passed, lic)
        report["tracking"] = tracking
        rundir.write_json(final / "export_report.json", report)
    for line in render_serving(report["serving"]):
        print(line)
    if not passed:
        raise VerificationFailed(
            f"the merged model agrees with base-in-4-bit + adapter on {verification['next_token_agreement']:.2%} of "
            f"next tokens, below export.min_next_token_agreement {verification['min_next_token_agreement']:.2%}. "
            f"Nothing was registered and the previous export in {out} (if any) is untouched; this one is kept for "
            f"inspection in {final} (report: {final / 'export_report.json'}). Try --merge-base dequantized (the "
            "weights the adapter was trained against), or check that model.path is the base the adapter was trained "
            "on.",
            report,
        )
    return report


def _new_staging_dir(out: Path) -> Path:
    """A fresh staging directory inside ``out``; staging left by an export that was killed is removed first."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        print(f"Removing {stale}, left by an export that did not finish", flush=True)
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    os.chmod(stage, 0o755)  # mkdtemp makes 0700; a failed export is published as this very directory
    return stage


def _publish(stage: Path, out: Path, final: Path) -> None:
    """Move a complete export from ``stage`` into place.

    A passing export replaces ``out``'s ``adapter/``, ``merged/``, ``verification/`` and ``export_report.json``
    one entry at a time, each by a rename (other files a user keeps in ``out`` are left alone). An export that
    failed verification becomes ``out/failed-verification/`` as a whole, replacing an older failed one.
    """
    if final != out:
        rundir.replace_dir(stage, final)
        return
    for entry in sorted(stage.iterdir()):
        if entry.is_dir():
            rundir.replace_dir(entry, out / entry.name)
        else:
            os.replace(entry, out / entry.name)


def _write_export(
    stage: Path,
    out: Path,
    recipe: Recipe,
    run_dir: Path,
    model_dir: Path,
    adapter: Adapter,
    adapter_dir: Path,
    lic: Any,
    license_name: str,
    ack: dict[str, Any],
    mlflow_run_id: str | None,
    *,
    merge: bool,
    base_kind: str,
    delta: Callable[[Any, Any, float, slice], Any] | None,
) -> dict[str, Any]:
    """Write the whole export into ``stage``; paths in the report are where ``_publish`` puts them."""
    from pipeline import licenses

    model_name = ack["model_name"]
    card = dict(recipe=recipe, run_dir=run_dir, model_name=model_name, ack=ack, lic=lic, mlflow_run_id=mlflow_run_id)

    # 1. Adapter only, PEFT format: what vLLM and TGI load next to the base.
    adapter_out = stage / "adapter"
    adapter_out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(adapter_dir / ADAPTER_WEIGHTS, adapter_out / ADAPTER_WEIGHTS)
    config = {**adapter.config, "base_model_name_or_path": recipe.model.path, "revision": recipe.model.revision}
    rundir.write_json(adapter_out / ADAPTER_CONFIG, config)
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, adapter_out / name)
    copied = _copy_license_files(model_dir, adapter_out)
    rundir.write_text(adapter_out / "NOTICE", licenses.notice_text(lic, license_name, recipe.model.path, copied))
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "out": str(out),
        "mlflow_run_id": mlflow_run_id,
        "model_name": model_name,
        "adapter_dir": str(out / "adapter"),
        "license_acknowledgment": ack,
    }

    # 2. Merged weights, streamed shard by shard, then verified against what was evaluated.
    if merge:
        merged_out = stage / "merged"
        print(f"Merging into the {base_kind} base weights of {model_dir}, one shard at a time ...", flush=True)
        merge_report = stream_merge(
            model_dir, adapter, merged_out, base_kind, recipe.quantization, delta=delta or lora_delta
        )
        merge_report.update(write_model_files(model_dir, adapter_dir, merged_out, merge_report["untied"]))
        copied = _copy_license_files(model_dir, merged_out)
        rundir.write_text(merged_out / "NOTICE", licenses.notice_text(lic, license_name, recipe.model.path, copied))
        adapter.lora.clear()  # the caller still holds the Adapter: free its tensors before verification loads models
        adapter.replaced.clear()
        rows, examples, task = _verification_examples(recipe, stage)
        verification = verify(recipe, model_dir, adapter_dir, merged_out, rows, examples, task)
        final = out if verification["passed"] else out / FAILED_DIR
        serving = _serving(recipe, config, model_name, final, verification["passed"])
        rundir.write_text(
            merged_out / "README.md",
            model_card(kind="merged", merge_report=merge_report, verification=verification, serving=serving, **card),
        )
        report.update(
            out=str(final),
            adapter_dir=str(final / "adapter"),
            merged_dir=str(final / "merged"),
            merge=merge_report,
            verification=verification,
        )
        print(
            f"Verification: next-token agreement {verification['next_token_agreement']:.4f} (required "
            f"{verification['min_next_token_agreement']}), max |logit diff| {verification['max_abs_logit_diff']:.4g}, "
            f"{verification['task_metric']} {verification['task_metric_reference']:.4f} -> "
            f"{verification['task_metric_merged']:.4f}" + ("" if verification["passed"] else ": FAILED")
        )
    else:
        serving = _serving(recipe, config, model_name, out, None)
    report["serving"] = serving
    # The adapter's card last: it names where this export puts the adapter and whether the merge passed.
    rundir.write_text(adapter_out / "README.md", model_card(kind="adapter", serving=serving, **card))
    rundir.write_json(stage / "export_report.json", report)
    return report


def _serving(recipe: Recipe, config: dict[str, Any], name: str, final: Path, merge_passed: bool | None) -> dict:
    """The ``serving`` section of the report and the cards: vLLM's verdict on the adapter, and the commands."""
    where = {"adapter_dir": str(final / "adapter"), "merged_dir": str(final / "merged")}
    return serving_report(config, base=recipe.model.path, name=name, merge_passed=merge_passed, **where)


def _verification_examples(recipe: Recipe, out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Task]:
    """The first ``export.verify_examples`` accepted eval rows, validated like training saw them, and the task."""
    from pipeline.data import prompt_format, sft_example, task_for, validate_data
    from pipeline.model import load_tokenizer, resolve_model_path, tokenizer_or_reason

    data = validate_data(recipe, out / "verification", tokenizer_or_reason)
    rows = data.eval.rows[: recipe.export.verify_examples]
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.path, recipe.model.revision))
    fmt = prompt_format(recipe, tokenizer)
    task = task_for(recipe, data.contract)
    return rows, [sft_example(row, task, fmt) for row in rows], task


def _track_export(
    uri: str,
    run_id: str,
    recipe: Recipe,
    run_dir: Path,
    report: dict[str, Any],
    out: Path,
    register: bool,
    lic: Any,
) -> dict[str, Any]:
    """Verification metrics and export tags on the training run; with ``register`` the merged model registered.

    Through ``tracking.Tracker`` on the training run (left in the status it has): a store that cannot be reached
    queues everything in ``<run_dir>/tracking/pending.jsonl`` for ``sync``, a call the store refuses (4xx) is
    recorded and skipped. The report of an export that passed (or had no merge) is the run's
    ``export/export_report.json``; one that failed verification goes to ``export/failed-verification/``, so the
    last good export's report stays where a reviewer reads it.

    ``register`` is only ever true for a merge that passed verification. The registered name is
    ``export.model_name`` (license-checked) when the recipe sets it, else ``<registered_model or recipe
    name>-merged`` with the prefix the license requires; the version carries the run's lineage tags and eval
    metrics, like the adapter's version.
    """
    from pipeline import licenses
    from pipeline.tracking import Tracker

    v = report.get("verification") or {}
    metrics = {
        f"export.verify.{k}": v[k]
        for k in ("next_token_agreement", "max_abs_logit_diff", "mean_abs_logit_diff", "task_metric_merged")
        if k in v
    }
    ack = report["license_acknowledgment"]
    tags = {
        "export.model_name": report["model_name"],
        "export.license_accepted": f"{ack['license']} at {ack['accepted_at']}",
        "export.vllm_adapter": "loads" if report["serving"]["vllm"]["loads"] else "refused",
    }
    if v:
        tags.update({"export.merge_base": report["merge"]["merge_base"], "export.verified": str(v["passed"])})
    tracker = Tracker(recipe, run_name=run_dir.name, run_dir=run_dir, run_id=run_id, uri=uri)
    tracker.log_metrics(metrics)
    tracker.set_tags(tags)
    failed = bool(v) and not v["passed"]
    tracker.log_artifact(out / "export_report.json", f"export/{FAILED_DIR}" if failed else "export")
    result: dict[str, Any] = {"logged": not tracker.offline}
    if register:
        if recipe.export.model_name:
            name = report["model_name"]
        else:
            default = f"{recipe.tracking.registered_model or recipe.name}-merged"
            name = licenses.derived_name(None, default, lic)
        version_tags = {**tracker.run_lineage(), **tags, **{k: str(val) for k, val in metrics.items()}}
        version_tags.update(kind="merged", task=recipe.task.name)
        tracker.log_artifact(out / "merged", "export/merged")
        version = tracker.register(name, "export/merged", version_tags, "merged weights (pipeline export)")
        if version is not None:
            result["registered"] = {"name": name, "version": version}
            print(f"Registered the merged model as {name} version {version}")
        elif tracker.offline:
            result["registration_queued"] = name
    if tracker.offline:
        result["logged"] = False
        result["queued"] = str(run_dir / "tracking" / "pending.jsonl")
    return result
