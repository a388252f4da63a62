"""``train(recipe)``: validate -> plan -> load the 4-bit base -> LoRA -> TRL SFTTrainer -> evaluate -> track.

One function, read top to bottom: each numbered block is one stage (seed, data, plan, model, trainer, train,
save, evaluate, register, summary), a helper call or a few lines; the helpers follow it in the same order. The
library objects come from the translators (``bnb_config``/``lora_config`` in ``model``, ``sft_config`` here),
never from splatting the recipe into a library.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from pipeline import __version__, checkpoints, licenses, rundir
from pipeline.contracts import ContractFailed
from pipeline.data import (
    PROMPT_RECORD,
    check_loss_masks,
    prompt_format,
    prompt_record,
    task_for,
    to_dataset,
    training_example,
    validate_data,
)
from pipeline.egress import redact_secrets
from pipeline.env import Env, environment_report, gather, project_commit
from pipeline.evaluate import LocalModel, evaluate_run
from pipeline.model import (
    attach_lora,
    check_attn_implementation,
    check_optimizer,
    count_4bit_linear,
    device_for,
    eos_token_ids,
    load_base,
    load_tokenizer,
    resolve_model_path,
    restore_adapter_dtype,
    tokenizer_or_reason,
    uses_fsdp,
    weight_files_digest,
)
from pipeline.plan import DoesNotFit, find_model_config, make_plan, render_plan
from pipeline.recipe import Recipe
from pipeline.review import NOTE_TAG, run_note
from pipeline.tracking import Tracker, dataset_inputs, lineage_tags, params_for

# Every logged training loss with the interval it covers, one JSON line each (loss_figures reads it).
LOSSES = "train_losses.jsonl"


@dataclass
class RunResult:
    """What a training run produced."""

    run_dir: Path
    mlflow_run_id: str | None
    metrics: dict[str, dict[str, Any]]
    plan: dict[str, Any]
    summary: dict[str, Any]
    model: Any  # the trained PEFT model, for notebooks and tests


def resolve_precision(recipe: Recipe, device: str, env: Env) -> str:
    """``training.precision``, 'auto' decided from the machine: bf16 where the GPU has it, else fp16; fp32 on CPU."""
    precision = recipe.training.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if env.bf16 else "fp16")
    return precision


def fsdp_settings(recipe: Recipe, env: Env) -> tuple[bool, dict[str, Any] | None]:
    """FSDP-QLoRA trainer settings (``fsdp``, ``fsdp_config``), or ``(False, None)`` for DDP or one process.

    FSDP1 (``version: 1``) on purpose: it is the FSDP-QLoRA path bitsandbytes documents and tests (flattened
    bf16-stored 4-bit weights); FSDP2's per-parameter sharding loses ``Params4bit``'s quantization state (the
    upstream issue and its state: benchmarks/train_speed.md, "Library facts"). Each key is FSDP1's name:

    - wrap each decoder layer (``TRANSFORMER_BASED_WRAP``; the layer class comes from the model's
      ``_no_split_modules``, e.g. ``LlamaDecoderLayer``), so one layer is gathered at a time;
    - ``use_orig_params``: the frozen 4-bit weights and the trainable LoRA weights share a layer's flat
      parameter, which FSDP1 allows only with the original parameters kept visible;
    - ``cpu_ram_efficient_loading`` + ``sync_module_states``: rank 0 reads the weights and broadcasts them,
      instead of every process holding a full copy in host RAM (8 x 140 GB for a 70B otherwise);
    - ``activation_checkpointing``: FSDP's own checkpointing replaces the trainer's (which would all-gather
      each layer a second time in backward).
    """
    if not (recipe.hardware.distributed == "fsdp" and env.world_size > 1):
        return False, None
    return True, {
        "version": 1,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": "full_shard",
        "use_orig_params": True,
        "cpu_ram_efficient_loading": True,
        "sync_module_states": True,
        "activation_checkpointing": recipe.training.gradient_checkpointing,
        "state_dict_type": "SHARDED_STATE_DICT",  # each rank writes its own shard: no 140 GB gather on rank 0
    }


def sft_config(recipe: Recipe, run_dir: Path, device: str, env: Env) -> Any:
    """The recipe's training section as TRL's ``SFTConfig``, field by field."""
    t = recipe.training
    precision = resolve_precision(recipe, device, env)
    distributed = env.world_size > 1
    fsdp, fsdp_config = fsdp_settings(recipe, env)
    # Under FSDP the trainer's checkpointing is replaced by FSDP's own (fsdp_config["activation_checkpointing"]).
    checkpointing = t.gradient_checkpointing and not fsdp
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        lr_scheduler_type=t.lr_scheduler_type,
        train_sampling_strategy=t.train_sampling_strategy,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps (since when: train_speed.md)
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # Non-reentrant checkpointing: works with frozen inputs (no enable_input_require_grads hack) and under DDP.
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # SealCheckpoints rotates, after sealing (checkpoints.rotate)
        report_to="none",  # pipeline logs to MLflow itself: one run, our param names
        disable_tqdm=True,  # progress is printed by ProgressCallback, readable in logs
        max_length=t.max_length,
        completion_only_loss=t.completion_only_loss,
        packing=t.packing,
        packing_strategy="bfd",  # best fit decreasing: whole examples, boundaries kept through position ids
        ddp_backend=("nccl" if device == "cuda" else "gloo") if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
        fsdp=fsdp,
        fsdp_config=fsdp_config,
    )


def train(
    recipe: Recipe,
    *,
    recipe_source: str | Path = "recipe",
    run_dir: str | Path | None = None,
    on_start: Callable[..., Any] | None = None,
    force: bool = False,
    resume: bool = False,
) -> RunResult:
    """Run the whole job for a recipe and return where its outputs are.

    Under several processes (``torchrun``, see ``cli``) every rank trains; only rank 0 writes the run directory,
    talks to MLflow, saves the adapter and evaluates.

    Args:
        recipe: A validated recipe.
        recipe_source: The recipe's file, named in error messages.
        run_dir: Output directory; ``runs/<name>/<run-id>/`` when not given.
        force: Train even when the plan says the recipe does not fit the GPU.
        on_start: Called once the run directory and MLflow run exist, with ``run_dir``, ``mlflow_run_id``
            and ``tracking_uri`` (the CLI uses it for the audit entry, even when the run fails later).
        resume: Continue ``run_dir`` from its newest complete checkpoint: adapter, optimizer, scheduler, RNG
            states and data position are restored, the same MLflow run is reopened, and the run then finishes
            (adapter, evaluation, summary) as an uninterrupted one would.

    Returns:
        The run directory, MLflow run id, metrics per system, the plan and the trained model.

    Raises:
        checkpoints.ResumeError: ``resume`` with nothing valid to resume, a finished run, or a changed recipe
            or train split.
    """
    started, env, main = time.time(), gather(), is_main_process()
    device = _checked_device(recipe, env)
    resume_from = checkpoints.resume_checkpoint(run_dir, recipe, set_aside=main) if resume else None
    out = Path(run_dir) if resume else rundir.new_run_dir(recipe.name, run_dir)

    # 1. Seed, before anything draws a random number (the LoRA initialization, the data order).
    set_seed(recipe.training.seed)
    with (
        _validation_dir(out, in_run_dir=main and resume_from is None) as reports_dir,
        Tracker.for_training(recipe, out, resume=resume_from is not None, main_process=main) as tracker,
    ):
        _open_run(tracker, recipe, out, resume_from, on_start)

        # 2. Data. The base must be here (and at the pinned revision) before the contract reads a million rows: a
        # wrong model.path is a recipe error that should cost seconds. Bad rows go to quarantine, not to training.
        model_dir = resolve_model_path(recipe.model.path, recipe.model.revision)
        try:
            data = validate_data(recipe, reports_dir, tokenizer_or_reason, recipe_source, require_tokenizer=True)
        except ContractFailed:
            _log_failed_contract(tracker, out)
            raise
        if resume_from is not None:
            checkpoints.check_train_split(out, data.report, recipe.data.train)
        task = task_for(recipe, data.contract, recipe_source)
        _log_validation(tracker, out, data)
        lineage = _lineage(tracker, recipe, model_dir)  # prints the license's obligations
        tokenizer = load_tokenizer(model_dir)
        fmt = prompt_format(recipe, tokenizer)  # the same rendering serves training and evaluation
        train_examples = [training_example(row, task, fmt, tokenizer) for row in data.train.rows]
        prompt = prompt_record(recipe, task, fmt, tokenizer, data.train.rows[0])

        # 3. Plan: the derived numbers, said out loud and saved before the expensive part.
        plan = _plan(recipe, model_dir, data.train.rows_accepted, env)
        tracker.write_artifact(
            out / "plan.json",
            dict(plan, device=device, prompt_format=fmt, prompt=prompt["rendering"], env=env.to_dict()),
        )
        _record_environment(tracker, out)
        _refuse_if_it_does_not_fit(plan, recipe_source, force)

        # 4. Model: the frozen 4-bit base and the trainable adapter.
        model, trainable = _load_model(recipe, model_dir, device, env)

        # 5. Trainer: TRL's SFTTrainer, then a check of what it will actually train on, before the first step.
        eos_ids = eos_token_ids(tokenizer, model)
        progress = ProgressCallback(tracker, out / LOSSES if main else None)
        trainer = _sft_trainer(
            recipe, model, tokenizer, train_examples, run_dir=out, device=device, env=env, progress=progress
        )
        masks, prepared = _check_training_data(trainer, train_examples, data.train.rows, eos_ids, recipe)
        # The first example as TRL tokenized it, beside our rendering of it: prompt.json is what training saw.
        prompt["example"]["trained_text"] = tokenizer.decode(prepared[0]["input_ids"])
        tracker.write_artifact(out / PROMPT_RECORD, prompt)

        # 6. Train (from the checkpoint when resuming).
        train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        num_4bit_after = count_4bit_linear(trainer.model)

        # 7. Save the adapter: every rank helps gather it, rank 0 publishes it; the other ranks are done here.
        partial = _gather_adapter(trainer, out)
        if not main:
            return RunResult(out, None, {}, plan, {}, trainer.model)
        _publish_adapter(trainer, tokenizer, partial, out, tracker)

        # 8. Evaluate evaluate.default_systems(recipe) as `evaluate --run` does (the same function, which logs eval.*
        # and eval/): base (adapter off), fine-tune (adapter on) and the recipe's baseline (or why it was skipped).
        local = LocalModel(trainer.model, tokenizer, eos_ids, device)
        evaluation = evaluate_run(recipe, out, data, task, fmt, local=local, tracker=tracker, device=device)
        tracker.set_tags({"eval.main_metric": task.main_metric})

        # 9. Register the adapter in the Model Registry (when the recipe asks).
        registered = register_adapter(tracker, recipe, evaluation.metrics, lineage)

        # 10. Summary.
        summary = {
            "run_dir": str(out),
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": redact_secrets(tracker.uri) if tracker.enabled else None,
            "device": device,
            "processes": env.world_size,
            "quantized_linear_layers": num_4bit_after,
            "trainable_parameters": trainable,
            **loss_figures(out / LOSSES),  # over all of the run's steps, resumed or not
            "optimizer_steps": trainer.state.global_step,
            "resumed_from": str(resume_from) if resume_from else None,
            "steps_this_run": trainer.state.global_step - progress.first_step,  # fewer when resumed
            "train_seconds": round(train_output.metrics.get("train_runtime", 0.0), 1),
            "total_seconds": round(time.time() - started, 1),
            "data": masks,
            "registered_model": registered,
        }
        _save_summary(tracker, out, summary)
        return RunResult(out, tracker.run_id, evaluation.metrics, plan, summary, trainer.model)


# --------------------------------------------------------------------------------------------------
# The stages of train(), in order.


def _checked_device(recipe: Recipe, env: Env) -> str:
    """The device to train on, once the recipe's attention implementation and optimizer are known to work there."""
    device = device_for(recipe, env)
    check_attn_implementation(recipe, device)
    check_optimizer(recipe, device)
    return device


@contextlib.contextmanager
def _validation_dir(out: Path, *, in_run_dir: bool) -> Iterator[Path]:
    """Where validation writes its report and quarantine: the run directory, or a scratch directory.

    Ranks other than 0 write nothing into the run directory. Nor does a resumed run's validation: the run's own
    report stays the record of the data it started on, which the resumed validation is compared with.
    """
    if in_run_dir:
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="pipeline-validation-") as scratch:
        yield Path(scratch)


def _open_run(
    tracker: Tracker, recipe: Recipe, out: Path, resume_from: Path | None, on_start: Callable[..., Any] | None
) -> None:
    """Tell ``on_start`` where the run is, then log the params, the first tags and the resolved recipe."""
    if on_start is not None:
        on_start(run_dir=out, mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri)
    tracker.log_params(params_for(recipe))
    tags = {
        "pipeline.version": __version__,
        "task": recipe.task.name,
        "base_model": recipe.model.path,
        "base_model.license": recipe.model.license or "unknown",
        "run_dir": str(out),
    }
    if resume_from is not None:
        tags["resumed_from_checkpoint"] = str(resume_from)
    tracker.set_tags(tags)
    tracker.write_artifact(out / "recipe.resolved.yaml", recipe.to_yaml())


def _log_failed_contract(tracker: Tracker, out: Path) -> None:
    """The reviewer of a failed run in MLflow needs the reason: the report, the quarantine, and a tag."""
    if (out / "validation").is_dir():
        tracker.log_artifact(out / "validation")
    tracker.set_tags({"contract": "failed"})


def _log_validation(tracker: Tracker, out: Path, data: Any) -> None:
    """The contract's report and quarantine, and each split as a dataset input."""
    tracker.log_artifact(out / "validation")
    tracker.log_inputs(dataset_inputs(data.report, data.contract))


def _lineage(tracker: Tracker, recipe: Recipe, model_dir: Path) -> dict[str, str]:
    """Print the license's obligations; tag the run with its lineage (code, base model, weights, license)."""
    license_entry, license_name, license_source = licenses.resolve(recipe.model.license, model_dir)
    print(licenses.render_obligations(license_entry, license_name, license_source))
    license_id = license_entry.id if license_entry else license_name
    weights, _ = weight_files_digest(model_dir)
    lineage = lineage_tags(recipe, model_dir, license_id, commit=project_commit(), weights_sha256=weights)
    tracker.set_tags(lineage)
    return lineage


def _plan(recipe: Recipe, model_dir: Path, rows: int, env: Env) -> dict[str, Any]:
    """The derived numbers for ``rows`` accepted training rows, printed."""
    model_config, config_source = find_model_config(str(model_dir))
    plan = make_plan(recipe, rows, model_config, world_size=env.world_size, model_dir=model_dir)
    print(render_plan(plan, config_source))
    return plan


def _record_environment(tracker: Tracker, out: Path) -> None:
    """``environment.json`` (machine, CUDA, every package version), logged, and its CUDA and GPU as tags."""
    environment = environment_report()
    tracker.write_artifact(out / "environment.json", environment)
    tracker.set_tags({"env.cuda": str(environment["cuda_version"]), "env.gpu": str(environment["gpu_name"])})


def _refuse_if_it_does_not_fit(plan: dict[str, Any], recipe_source: str | Path, force: bool) -> None:
    """Stop before any weights load when the plan says the recipe does not fit (unless ``--force``)."""
    fit = plan.get("fit") or {}
    if fit.get("fits") is False and not force:
        raise DoesNotFit(
            f"{recipe_source}: {fit['message']}. Refused before loading any weights; try:\n  - "
            + "\n  - ".join(fit["suggestions"])
            + "\n(or pass --force to train anyway)"
        )


def _load_model(recipe: Recipe, model_dir: Path, device: str, env: Env) -> tuple[Any, int]:
    """The 4-bit base with LoRA attached, said out loud; returns it and its number of trainable parameters."""
    model = attach_lora(load_base(recipe, model_dir, device), recipe)
    num_4bit = count_4bit_linear(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"Base loaded from {model_dir}: {num_4bit} linear layers in 4-bit "
        f"({recipe.quantization.quant_type if recipe.quantization.load_in_4bit else 'off'}), "
        f"{trainable:,} trainable parameters, device {device}"
        + (f", {env.world_size} processes ({'FSDP' if uses_fsdp(recipe) else 'DDP'})" if env.world_size > 1 else "")
    )
    return model, trainable


def _sft_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_examples: list[dict[str, Any]],
    *,
    run_dir: Path,
    device: str,
    env: Env,
    progress: ProgressCallback,
) -> Any:
    """TRL's ``SFTTrainer`` over the examples, printing through ``progress`` and sealing each checkpoint."""
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, run_dir, device, env),
        train_dataset=to_dataset(train_examples),
        processing_class=tokenizer,
        callbacks=[progress, SealCheckpoints(recipe.training.save_total_limit)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    restore_adapter_dtype(trainer.model, recipe)
    return trainer


def _check_training_data(
    trainer: Any, train_examples: list[dict[str, Any]], rows: list[dict[str, Any]], eos_ids: set[int], recipe: Recipe
) -> tuple[dict[str, Any], Any]:
    """The loss-mask check on what TRL prepared (``data.check_loss_masks``): its counts (printed) and the examples.

    The examples are one per row, in order, as TRL tokenized them (before packing).
    """
    t = recipe.training
    prepared = trainer.train_dataset if not t.packing else prepared_without_packing(trainer, to_dataset(train_examples))
    per_turn = recipe.task.is_chat
    masks = check_loss_masks(prepared, [r["_row"] for r in rows], eos_ids, t.max_length, per_turn=per_turn)
    print(
        f"Training data: {masks['examples']:,} examples, {masks['completion_tokens']:,} completion tokens "
        + (f"in {masks['trained_turns']:,} assistant turns " if per_turn else "")
        + f"in the loss, longest example {masks['longest_example_tokens']} tokens "
        f"(max_length {t.max_length}"
        + (f", packed into {len(trainer.train_dataset):,} rows" if t.packing else "")
        + ")"
    )
    if masks.get("turns_cut_by_max_length"):
        rows_cut = masks["rows_with_cut_turns"]
        print(
            f"warning: {masks['turns_cut_by_max_length']} assistant turns are cut by training.max_length "
            f"{t.max_length} (train lines {', '.join(map(str, rows_cut[:10]))}"
            + (f", ... {len(rows_cut) - 10} more" if len(rows_cut) > 10 else "")
            + "): they train without their end-of-turn token; raise max_length or shorten them"
        )
    return masks, prepared


def _gather_adapter(trainer: Any, out: Path) -> Path:
    """Save the trained adapter beside the run (``.adapter.partial``); under FSDP every rank helps gather it.

    Written beside the run and renamed into place when complete (``_publish_adapter``): a crash never leaves an
    adapter/ that looks finished but is not. Rank 0 writes (the trainer checks).
    """
    if trainer.is_fsdp_enabled:
        # Checkpoints are sharded (one file per rank, fast); the adapter is gathered whole, in PEFT's format.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    partial = out / ".adapter.partial"
    trainer.save_model(str(partial))
    return partial


def _publish_adapter(trainer: Any, tokenizer: Any, partial: Path, out: Path, tracker: Tracker) -> None:
    """Complete the adapter with its tokenizer, move it into place, and save and log the training history."""
    tokenizer.save_pretrained(partial)
    rundir.replace_dir(partial, out / "adapter")
    rundir.write_json(out / "train_log.json", trainer.state.log_history)
    save_loss_plot(out / "loss.png", [entry for entry in trainer.state.log_history if "loss" in entry])
    tracker.log_artifact(out / "adapter")
    tracker.log_artifact(out / "loss.png")


def _save_summary(tracker: Tracker, out: Path, summary: dict[str, Any]) -> None:
    """The run's time and loss figures as metrics, ``summary.json`` written and logged, the run's description."""
    figures = {"train.total_seconds": summary["total_seconds"]}
    figures.update(
        {f"train.{k}": v for k in ("loss_mean", "loss_last") if (v := summary.get(f"train_{k}")) is not None}
    )
    tracker.log_metrics(figures)
    tracker.write_artifact(out / "summary.json", summary)
    document = rundir.read_json(out / "eval" / "metrics.json")
    tracker.set_tags({NOTE_TAG: run_note(document, str(out / "adapter"), summary["registered_model"])})


def loss_figures(losses_file: Path) -> dict[str, Any]:
    """The run's training loss, each figure named for what it is, from ``train_losses.jsonl``.

    ``train_loss_mean``: the mean over the steps the logged losses cover (``train_loss_steps``, all of them unless
    a resume started from a checkpoint older than the last log before an interruption): each logged loss is the
    mean over its interval, weighted by its length. The trainer's own ``training_loss`` covers only the steps after
    a resume (0.769 against 1.205 uninterrupted). ``train_loss_last``: the last logged loss, lower than the mean
    on a run that is still learning.
    """
    rows = (
        [json.loads(line) for line in losses_file.read_text().splitlines() if line.strip()]
        if losses_file.is_file()
        else []
    )
    if not rows:
        return {"train_loss_mean": None, "train_loss_last": None, "train_loss_steps": None}
    rows.sort(key=lambda r: r["step"])
    covered = sum(r["step"] - r["since"] for r in rows)
    mean = sum(r["loss"] * (r["step"] - r["since"]) for r in rows) / covered
    first = min(r["since"] for r in rows) + 1
    steps = f"{first}-{rows[-1]['step']}" + ("" if covered == rows[-1]["step"] - first + 1 else " (with gaps)")
    return {"train_loss_mean": mean, "train_loss_last": rows[-1]["loss"], "train_loss_steps": steps}


def register_adapter(
    tracker: Tracker, recipe: Recipe, metrics: dict[str, dict[str, Any]], lineage: dict[str, str]
) -> dict[str, str | None] | None:
    """The run's ``adapter`` artifact as a new Model Registry version, tagged with eval metrics and lineage."""
    if not (recipe.tracking.enabled and recipe.tracking.register_adapter):
        return None
    name = recipe.tracking.registered_model or recipe.name
    tags = {f"eval.{system}.{k}": str(v) for system, values in metrics.items() for k, v in values.items()}
    tags.update(lineage)
    tags.update({"kind": "adapter", "task": recipe.task.name})
    version = tracker.register(name, "adapter", tags, description=f"LoRA adapter for {recipe.model.path}")
    if version:
        print(f"Registered the adapter as {name} version {version} in the MLflow Model Registry")
    return {"name": name, "version": version}


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process: the one that writes outputs and talks to MLflow."""
    return int(os.environ.get("RANK", "0")) == 0


def prepared_without_packing(trainer: Any, dataset: Any) -> Any:
    """TRL's own preparation of ``dataset`` (tokenize, mask, truncate) minus the packing step: one row per example.

    The loss-mask check must see each example exactly as TRL tokenized and truncated it. With packing the
    trainer's dataset holds packed rows (examples concatenated, row numbers dropped), and TRL has no public API
    for the preparation alone: ``SFTTrainer`` runs it inside ``__init__`` and keeps only the result, and
    ``trl.data_utils`` offers packing but not the tokenization. A second trainer with packing off would wrap the
    model again. So this is the one call into TRL's private API, by keyword so a renamed parameter fails instead
    of binding to the wrong one; ``tests/test_train.py`` checks the signature and names the TRL version when it
    changes.
    """
    return trainer._prepare_dataset(
        dataset=dataset,
        processing_class=trainer.processing_class,
        args=trainer.args,
        packing=False,
        formatting_func=None,
        dataset_name="train",
    )


class SealCheckpoints(TrainerCallback):
    """Seals each checkpoint once the trainer has written it (see ``pipeline.checkpoints``).

    ``on_save`` runs after ``Trainer._save_checkpoint`` returned, i.e. after every file of the checkpoint was
    written; a crash before this leaves an unsealed checkpoint that resume skips. Under DDP/FSDP each rank
    returns when its own files are written (``rng_state_<rank>.pth``; FSDP's sharded optimizer state), with no
    barrier after them, so every rank waits here first and rank 0 then seals every file present.
    """

    def __init__(self, keep: int):
        self.keep = keep  # training.save_total_limit

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        """Called by the trainer on every rank after each checkpoint: seal it, then delete the oldest."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # all ranks' files are on disk before rank 0 hashes the directory
        if state.is_world_process_zero:
            checkpoints.seal(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            checkpoints.rotate(args.output_dir, self.keep)


class ProgressCallback(TrainerCallback):
    """Forwards the trainer's logs to MLflow (``train.loss`` etc. by step) and prints readable progress."""

    NAMES = {"loss": "train.loss", "learning_rate": "train.learning_rate", "grad_norm": "train.grad_norm"}

    def __init__(self, tracker: Tracker, losses_file: Path | None = None):
        self.tracker = tracker
        self.losses_file = losses_file  # None: not the main process
        self.started = time.time()
        self.first_step = self.last_step = self.logged_through = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        """Rates count from here: a resumed run starts at its checkpoint's step."""
        self.started = time.time()
        self.first_step = self.last_step = state.global_step
        # A run resumed from a checkpoint older than its last log trains those steps again (to the same values):
        # they are logged already, and a second point per step would draw the curve twice and skew the mean.
        if self.losses_file is not None and self.losses_file.is_file() and not state.global_step:
            self.losses_file.unlink()  # a new run in a reused directory: an earlier run's losses are not its own
        if self.losses_file is not None and self.losses_file.is_file():
            steps = [json.loads(line)["step"] for line in self.losses_file.read_text().splitlines() if line.strip()]
            self.logged_through = max(steps, default=0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        """Called by the trainer every ``logging_steps``."""
        if not logs:
            return
        if state.global_step > self.logged_through:
            self.tracker.log_metrics(
                {self.NAMES[k]: v for k, v in logs.items() if k in self.NAMES}, step=state.global_step
            )
            if "loss" in logs and self.losses_file is not None:
                # Each logged loss is the trainer's mean since its previous log (or since the resume): kept with
                # that interval, one line as it happens, so a kill -9 loses nothing logged.
                with self.losses_file.open("a", encoding="utf-8") as handle:
                    handle.write(
                        json.dumps({"step": state.global_step, "since": self.last_step, "loss": logs["loss"]}) + "\n"
                    )
        if "loss" in logs:
            self.last_step = state.global_step
        if "loss" in logs:
            elapsed = time.time() - self.started
            rate = (state.global_step - self.first_step) / elapsed if elapsed else 0.0
            eta = (state.max_steps - state.global_step) / rate if rate else 0.0
            print(
                f"  step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                f"lr {logs.get('learning_rate', 0):.2e}  grad norm {logs.get('grad_norm', 0):.2f}  "
                f"({elapsed:.0f}s elapsed, ~{eta:.0f}s left)",
                flush=True,
            )


def save_loss_plot(path: Path, history: list[dict[str, Any]]) -> None:
    """Training loss by optimizer step as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
