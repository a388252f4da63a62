"""``train(recipe)``: validate -> plan -> load the 4-bit base -> LoRA -> TRL SFTTrainer -> evaluate -> track.

One function, read top to bottom. Each numbered block is one stage; the library objects come from the
translators (``bnb_config``/``lora_config`` in ``model``, ``sft_config`` here), never from splatting the
recipe into a library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from pipeline import __version__, licenses, rundir
from pipeline.data import check_loss_masks, prompt_format, sft_example, task_for, to_dataset, validate_data
from pipeline.env import Env, environment_report, gather
from pipeline.evaluate import LocalModel, evaluate_run
from pipeline.model import (
    attach_lora,
    count_4bit_linear,
    device_for,
    eos_token_ids,
    load_base,
    load_tokenizer,
    resolve_model_path,
    restore_adapter_dtype,
)
from pipeline.plan import DoesNotFit, find_model_config, make_plan, render_plan
from pipeline.privacy import redact_secrets
from pipeline.recipe import Recipe
from pipeline.tracking import LineageTracker, Tracker, dataset_inputs, lineage_tags, params_for


@dataclass
class RunResult:
    """What a training run produced."""

    run_dir: Path
    mlflow_run_id: str | None
    metrics: dict[str, dict[str, Any]]
    plan: dict[str, Any]
    summary: dict[str, Any]
    model: Any  # the trained PEFT model, for notebooks and tests


def sft_config(recipe: Recipe, run_dir: Path, device: str, env: Env) -> Any:
    """The recipe's training section as TRL's ``SFTConfig``, field by field."""
    t = recipe.training
    precision = t.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if env.bf16 else "fp16")
    distributed = env.world_size > 1
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        lr_scheduler_type=t.lr_scheduler_type,
        train_sampling_strategy=t.train_sampling_strategy,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps (transformers 5)
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to="none",  # pipeline logs to MLflow itself: one run, our param names
        disable_tqdm=True,  # progress is printed by ProgressCallback, readable in logs
        max_length=t.max_length,
        completion_only_loss=True,
        packing=False,
        ddp_backend=("nccl" if device == "cuda" else "gloo") if distributed else None,
        ddp_find_unused_parameters=False if distributed else None,
    )


def train(
    recipe: Recipe,
    *,
    recipe_source: str | Path = "recipe",
    run_dir: str | Path | None = None,
    on_start: Callable[..., Any] | None = None,
    force: bool = False,
) -> RunResult:
    """Run the whole job for a recipe and return where its outputs are.

    Args:
        recipe: A validated recipe.
        recipe_source: The recipe's file, named in error messages.
        run_dir: Output directory; ``runs/<name>/<run-id>/`` when not given.
        force: Train even when the plan says the recipe does not fit the GPU.
        on_start: Called once the run directory and MLflow run exist, with ``run_dir``, ``mlflow_run_id``
            and ``tracking_uri`` (the CLI uses it for the audit entry, even when the run fails later).

    Returns:
        The run directory, MLflow run id, metrics per system, the plan and the trained model.
    """
    started = time.time()
    env = gather()
    device = device_for(recipe, env)
    out = rundir.new_run_dir(recipe.name, run_dir)
    rundir.write_text(out / "recipe.resolved.yaml", recipe.to_yaml())
    set_seed(recipe.training.seed)
    tracker = LineageTracker(recipe, run_name=out.name, run_dir=out)
    if on_start is not None:
        on_start(run_dir=out, mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri)
    status = "FAILED"
    try:
        tracker.log_params(params_for(recipe))
        tracker.set_tags(
            {
                "pipeline.version": __version__,
                "task": recipe.task,
                "base_model": recipe.model.path,
                "base_model.license": recipe.model.license or "unknown",
                "run_dir": str(out),
            }
        )
        tracker.log_artifact(out / "recipe.resolved.yaml")

        # 1. Data: the contract runs before any weights load; bad rows go to quarantine, not to training.
        data = validate_data(recipe, out, recipe_source)
        task = task_for(recipe, data.contract)
        tracker.log_artifact(out / "validation")
        tracker.log_inputs(dataset_inputs(data.report, data.contract))

        # 2. Tokenizer and prompts: the same rendering serves training and evaluation.
        model_dir = resolve_model_path(recipe.model.path, recipe.model.revision)
        license_entry, license_name, license_source = licenses.resolve(recipe.model.license, model_dir)
        print(licenses.render_obligations(license_entry, license_name, license_source))
        lineage = lineage_tags(recipe, model_dir, license_entry.id if license_entry else license_name)
        tracker.set_tags(lineage)
        tokenizer = load_tokenizer(model_dir)
        fmt = prompt_format(recipe, tokenizer)
        train_examples = [sft_example(row, task, fmt) for row in data.train.rows]

        # 3. Derived numbers, said out loud and saved before the expensive part.
        model_config, config_source = find_model_config(str(model_dir))
        plan = make_plan(recipe, data.train.rows_accepted, model_config, world_size=env.world_size)
        print(render_plan(plan, config_source))
        rundir.write_json(out / "plan.json", {**plan, "device": device, "prompt_format": fmt, "env": env.to_dict()})
        tracker.log_artifact(out / "plan.json")
        environment = environment_report()
        rundir.write_json(out / "environment.json", environment)
        tracker.log_artifact(out / "environment.json")
        tracker.set_tags({"env.cuda": str(environment["cuda_version"]), "env.gpu": str(environment["gpu_name"])})
        fit = plan.get("fit") or {}
        if fit.get("fits") is False and not force:
            raise DoesNotFit(
                f"{recipe_source}: {fit['message']}. Refused before loading any weights; try:\n  - "
                + "\n  - ".join(fit["suggestions"])
                + "\n(or pass --force to train anyway)"
            )

        # 4. The frozen 4-bit base and the trainable adapter.
        model = load_base(recipe, model_dir, device)
        model = attach_lora(model, recipe)
        num_4bit = count_4bit_linear(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"Base loaded from {model_dir}: {num_4bit} linear layers in 4-bit "
            f"({recipe.quantization.quant_type if recipe.quantization.load_in_4bit else 'off'}), "
            f"{trainable:,} trainable parameters, device {device}"
        )

        # 5. TRL's trainer, then a check of what it will actually train on, before the first step.
        eos_ids = eos_token_ids(tokenizer, model)
        trainer = SFTTrainer(
            model=model,
            args=sft_config(recipe, out, device, env),
            train_dataset=to_dataset(train_examples),
            processing_class=tokenizer,
            callbacks=[ProgressCallback(tracker)],
        )
        trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
        restore_adapter_dtype(trainer.model, recipe)
        masks = check_loss_masks(
            trainer.train_dataset, [r["_row"] for r in data.train.rows], eos_ids, recipe.training.max_length
        )
        print(
            f"Training data: {masks['examples']:,} examples, {masks['completion_tokens']:,} completion tokens "
            f"in the loss, longest example {masks['longest_example_tokens']} tokens "
            f"(max_length {recipe.training.max_length})"
        )

        # 6. Train and save the adapter.
        train_output = trainer.train()
        num_4bit_after = count_4bit_linear(trainer.model)
        trainer.save_model(str(out / "adapter"))
        tokenizer.save_pretrained(out / "adapter")
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        rundir.write_json(out / "train_log.json", trainer.state.log_history)
        save_loss_plot(out / "loss.png", history)
        tracker.log_artifact(out / "adapter")
        tracker.log_artifact(out / "loss.png")

        # 7. Evaluate: base (adapter off), fine-tune (adapter on) and the baseline if the recipe lists it.
        # The same function serves `python -m pipeline evaluate --run`; it logs eval.* and eval/ to MLflow.
        evaluation = evaluate_run(
            recipe,
            out,
            data,
            task,
            fmt,
            local=LocalModel(trainer.model, tokenizer, eos_ids, device),
            tracker=tracker,
            device=device,
        )
        metrics = evaluation.metrics
        tracker.set_tags({"eval.main_metric": task.main_metric})
        registered = register_adapter(tracker, recipe, metrics, lineage)

        summary = {
            "run_dir": str(out),
            "mlflow_run_id": tracker.run_id,
            "tracking_uri": redact_secrets(tracker.uri) if tracker.enabled else None,
            "device": device,
            "quantized_linear_layers": num_4bit_after,
            "trainable_parameters": trainable,
            "train_loss": train_output.training_loss,
            "optimizer_steps": trainer.state.global_step,
            "train_seconds": round(train_output.metrics.get("train_runtime", 0.0), 1),
            "total_seconds": round(time.time() - started, 1),
            "data": masks,
            "registered_model": registered,
        }
        tracker.log_metrics(
            {"train.total_seconds": summary["total_seconds"], "train.final_loss": summary["train_loss"]}
        )
        rundir.write_json(out / "summary.json", summary)
        tracker.log_artifact(out / "summary.json")
        status = "FINISHED"
        return RunResult(out, tracker.run_id, metrics, plan, summary, trainer.model)
    finally:
        tracker.end(status)


def register_adapter(
    tracker: LineageTracker, recipe: Recipe, metrics: dict[str, dict[str, Any]], lineage: dict[str, str]
) -> dict[str, str | None] | None:
    """The run's ``adapter`` artifact as a new Model Registry version, tagged with eval metrics and lineage."""
    if not (recipe.tracking.enabled and recipe.tracking.register_adapter):
        return None
    name = recipe.tracking.registered_model or recipe.name
    tags = {f"eval.{system}.{k}": str(v) for system, values in metrics.items() for k, v in values.items()}
    tags.update(lineage)
    tags.update({"kind": "adapter", "task": recipe.task})
    version = tracker.register(name, "adapter", tags, description=f"LoRA adapter for {recipe.model.path}")
    if version:
        print(f"Registered the adapter as {name} version {version} in the MLflow Model Registry")
    return {"name": name, "version": version}


class ProgressCallback(TrainerCallback):
    """Forwards the trainer's logs to MLflow (``train.loss`` etc. by step) and prints readable progress."""

    NAMES = {"loss": "train.loss", "learning_rate": "train.learning_rate", "grad_norm": "train.grad_norm"}

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.started = time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        """Called by the trainer every ``logging_steps``."""
        if not logs:
            return
        self.tracker.log_metrics({self.NAMES[k]: v for k, v in logs.items() if k in self.NAMES}, step=state.global_step)
        if "loss" in logs:
            elapsed = time.time() - self.started
            rate = state.global_step / elapsed if elapsed else 0.0
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
