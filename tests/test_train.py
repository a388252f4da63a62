"""The real 4-bit QLoRA path on CPU, through the shared session run (see conftest.trained_run)."""

import json
import math

import pytest
import torch
import yaml
from conftest import ROOT
from helpers import run_cli, run_main
from safetensors.torch import load_file


def test_run_directory_holds_every_output(trained_run):
    out = trained_run.run_dir
    for name in [
        "recipe.resolved.yaml",
        "plan.json",
        "summary.json",
        "loss.png",
        "validation/report.json",
        "validation/quarantine.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "eval/predictions.jsonl",
        "eval/metrics.json",
        "eval/report.md",
        "eval/per_label_f1.png",
    ]:
        assert (out / name).is_file(), name


def test_linear_layers_are_4bit_during_training(trained_run):
    import bitsandbytes as bnb

    # 2 layers x 7 projections; counted on the trainer's model after the last step.
    assert trained_run.summary["quantized_linear_layers"] == 14
    wrapped = [m for n, m in trained_run.model.named_modules() if n.endswith("q_proj")]
    assert wrapped and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)


def test_lora_weights_changed_and_base_weights_did_not(trained_run, tiny_assets):
    from pipeline.model import load_base
    from pipeline.recipe import load_recipe

    adapter = load_file(trained_run.run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    # lora_B starts at zero (peft's init): any non-zero value was learned.
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)

    recipe = load_recipe(trained_run.run_dir / "recipe.resolved.yaml")
    fresh = load_base(recipe, tiny_assets["model"], "cpu")
    fresh_weights = {n: p for n, p in fresh.named_parameters()}
    trained = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in trained_run.model.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }
    trained = {n.replace(".original_module", ""): p for n, p in trained.items()}
    compared = 0
    for name, param in fresh_weights.items():
        assert name in trained, name
        assert torch.equal(trained[name].data.cpu().view(-1), param.data.view(-1)), f"{name} changed"
        compared += 1
    assert compared == len(fresh_weights) > 14
    # The trainable embedding copy (modules_to_save) did change.
    embed = next(v for k, v in adapter.items() if "embed_tokens" in k)
    assert not torch.equal(embed, fresh.get_input_embeddings().weight.data)


def test_loss_is_finite_and_logged(trained_run):
    log = json.loads((trained_run.run_dir / "train_log.json").read_text())
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert trained_run.summary["optimizer_steps"] == trained_run.plan["optimizer_steps"] == 12


def test_eval_scores_both_systems_and_writes_predictions(trained_run):
    metrics = json.loads((trained_run.run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"base", "finetuned"}
    for values in metrics["systems"].values():
        assert 0.0 <= values["micro_f1"] <= 1.0 and values["num_examples"] == 24
        assert 0 <= values["cut_at_max_new_tokens"] <= 24
    lines = (trained_run.run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 48
    first = json.loads(lines[0])
    assert {"system", "id", "row", "gold", "predicted", "answer", "stopped"} <= set(first)
    report = (trained_run.run_dir / "eval" / "report.md").read_text()
    assert "| finetuned |" in report and "| base |" in report
    # The recipe has a baseline section with send_data: false (from medical_coding.yaml): train evaluates it
    # like `evaluate` would, sends nothing, and says it was skipped and why.
    assert metrics["baseline"]["status"] == "skipped" and metrics["baseline"]["rows_sent"] == 0
    assert "was skipped: baseline.send_data is false" in report


def test_completion_cut_by_max_length_is_quarantined_by_the_contract(recipe_with, tmp_path):
    path = recipe_with(
        "short.yaml",
        training={"max_length": 40},
        tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "short"},
    )
    result = run_main("train", str(path), "--run-dir", str(tmp_path / "run"))  # in-process: no second torch import
    # The contract's token check (with the recipe's tokenizer) catches it: every row is quarantined with the
    # reason, and the run stops before the model loads.
    assert result.returncode == 1, result.stderr[-2000:]
    assert "data contract failed" in result.stderr and "Traceback" not in result.stderr
    assert "no row of the train split passed the contract (max_tokens x160)" in result.stderr
    assert f"see {tmp_path / 'run' / 'validation' / 'quarantine.jsonl'}" in result.stderr  # the file, not a pattern
    quarantine = [json.loads(line) for line in (tmp_path / "run" / "validation" / "quarantine.jsonl").open()]
    assert {r["check"] for q in quarantine for r in q["reasons"]} == {"max_tokens"}
    assert any("above max_tokens 40: truncation would cut" in r["message"] for q in quarantine for r in q["reasons"])
    # Stopped at step 1: before the plan, the weights and any adapter.
    assert not (tmp_path / "run" / "plan.json").exists() and not (tmp_path / "run" / "adapter").exists()
    # The failed run in MLflow says why: FAILED, tagged, with the contract's report and quarantine.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run_id = json.loads((tmp_path / "run" / "tracking" / "run.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["contract"] == "failed"
    logged = {f.path for f in client.list_artifacts(run_id, "validation")}
    assert {"validation/report.json", "validation/quarantine.jsonl", "validation/report.md"} <= logged


def test_completion_cut_by_max_length_stops_before_the_first_step(tiny_assets, recipe_with, tmp_path):
    # Without the contract's token check, the loss-mask check on what TRL prepared is the second line of defence.
    contract = yaml.safe_load((ROOT / "data_contracts" / "medical_coding.yaml").read_text())
    contract.pop("tokens")
    contract_path = tmp_path / "no_tokens.yaml"
    contract_path.write_text(yaml.safe_dump(contract))
    path = recipe_with(
        "short.yaml",
        data={"contract": str(contract_path)},
        training={"max_length": 40},
        tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "short"},
    )
    result = run_main("train", str(path), "--run-dir", str(tmp_path / "run"))  # in-process: no second torch import
    assert result.returncode == 1, result.stderr[-2000:]
    assert "training data check failed before the first step" in result.stderr
    assert "Raise training.max_length (now 40)" in result.stderr
    assert not (tmp_path / "run" / "adapter").exists()


def test_missing_model_is_one_clear_error(recipe_with, tmp_path):
    path = recipe_with("nomodel.yaml", model={"path": str(tmp_path / "absent")}, tracking={"enabled": False})
    result = run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"model.path: {tmp_path / 'absent'}: no such directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_loss_masks_names_the_rows():
    from pipeline.data import LossMaskError, check_loss_masks

    prepared = [
        {"row": 1, "input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
        {"row": 2, "input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},  # EOS cut off
    ]
    with pytest.raises(LossMaskError, match=r"1 rows have a completion cut .*lines 2\)"):
        check_loss_masks(prepared, [1, 2], {2}, max_length=4)
    with pytest.raises(LossMaskError, match=r"1 rows lost every completion token .*lines 3\)"):
        check_loss_masks(prepared[:1], [1, 3], {2}, max_length=4)
    assert check_loss_masks(prepared[:1], [1], {2}, max_length=4)["completion_tokens"] == 2


def test_the_private_trl_call_still_has_its_signature():
    """``train.prepared_without_packing`` is the one reach into TRL's private API; this says when TRL moves it."""
    import inspect

    import trl
    from trl import SFTTrainer

    method = getattr(SFTTrainer, "_prepare_dataset", None)
    assert method is not None, (
        f"TRL {trl.__version__}: SFTTrainer._prepare_dataset is gone; pipeline.train.prepared_without_packing needs "
        "another way to prepare the training set without packing (see benchmarks/train_speed.md)"
    )
    expected = ["self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"]
    found = list(inspect.signature(method).parameters)
    assert found == expected, (
        f"TRL {trl.__version__} changed SFTTrainer._prepare_dataset's parameters to {found} (expected {expected}); "
        "update pipeline.train.prepared_without_packing"
    )
