"""Export: streaming merge (equal to peft's), verification, adapter-only export, model card, license gate."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

ACCEPT = ["--set", "model.license_accepted=true", "--set", "export.verify_examples=3"]


def export_cli(*args: str) -> int:
    """The CLI in-process (the session's libraries and ICD table are already loaded)."""
    from pipeline.cli import main

    return main(["export", *args])


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """One verified merge (dequantized base) of the session's trained run, registered in MLflow."""
    out = tmp_path_factory.mktemp("export")
    code = export_cli(str(trained_run.run_dir), "--merge", "--out", str(out), "--register", *ACCEPT)
    assert code == 0
    return out, json.loads((out / "export_report.json").read_text())


def test_merged_export_is_a_loadable_model_in_the_base_dtype(exported, tiny_assets):
    out, report = exported
    merged = out / "merged"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md", "NOTICE"):
        assert (merged / name).is_file(), name
    config = json.loads((merged / "config.json").read_text())
    # The demo trains embed_tokens on a tied base: the head keeps the frozen embedding, so the export is untied.
    assert config["tie_word_embeddings"] is False and report["merge"]["untied"] is True
    assert report["merge"]["dtypes"] == {"F32": 21}  # 20 base tensors + the untied head, all in the base's dtype
    generation = json.loads((merged / "generation_config.json").read_text())
    base_config = json.loads((tiny_assets["model"] / "config.json").read_text())
    assert generation["eos_token_id"] == base_config["eos_token_id"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not (model.lm_head.weight == model.model.embed_tokens.weight).all()


def test_verification_passes_for_the_dequantized_merge_and_is_logged(exported, trained_run):
    out, report = exported
    v = report["verification"]
    assert v["passed"] and v["next_token_agreement"] == 1.0 and v["examples"] == 3 and v["positions"] > 3
    assert v["max_abs_logit_diff"] < 1e-4
    assert v["task_metric_reference"] == v["task_metric_merged"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.summary["tracking_uri"])
    run = client.get_run(trained_run.mlflow_run_id)
    assert run.data.metrics["export.verify.next_token_agreement"] == 1.0
    assert run.data.tags["export.verified"] == "True" and run.data.tags["export.merge_base"] == "dequantized"
    assert "export/export_report.json" in [a.path for a in client.list_artifacts(run.info.run_id, "export")]
    (version,) = client.search_model_versions("name='tiny-merged'")
    assert version.run_id == trained_run.mlflow_run_id and version.tags["kind"] == "merged"
    assert version.source.endswith("export/merged")
    # The same lineage tags and eval metrics as the adapter's version, read back from the training run.
    (adapter_version,) = [v for v in client.search_model_versions("name='tiny'") if v.run_id == run.info.run_id]
    for key in ("pipeline.git_commit", "base_model", "base_model.weights_sha256", "base_model.license"):
        assert version.tags[key] == adapter_version.tags[key] == run.data.tags[key], key
    eval_keys = {k for k in adapter_version.tags if k.startswith("eval.finetuned.")}
    assert eval_keys and all(float(version.tags[k]) == float(adapter_version.tags[k]) for k in eval_keys)
    assert report["tracking"]["registered"] == {"name": "tiny-merged", "version": str(version.version)}


def test_adapter_export_is_peft_format_and_loads_next_to_the_base(exported, tiny_assets):
    out, report = exported
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(out / "adapter")
    assert config.base_model_name_or_path == str(tiny_assets["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())
    card = (out / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card


def test_model_card_has_every_section_and_no_raw_data(exported, tiny_assets, trained_run):
    out, report = exported
    card = (out / "merged" / "README.md").read_text()
    for heading in ("## License", "## Training data", "## Training settings", "## Evaluation", "## Merge"):
        assert heading in card, heading
    # The prompt it was trained with, as prompt.json records it: the medical preset through the plain format.
    assert "## Prompt" in card and "You are a certified medical coder." in card
    assert "Note: {note}\nCodes:" in card and "prompt format `plain`" in card
    for heading in ("## Intended use", "## Limitations"):
        assert heading in card
    assert trained_run.mlflow_run_id in card and "Apache License 2.0" in card
    assert "| eval | 24 | 24 | 0 |" in card and "| finetuned |" in card and "next-token agreement 1.0000" in card
    notes = [json.loads(line)["note"] for line in (tiny_assets["data"] / "train.jsonl").read_text().splitlines()]
    assert not any(note[:40] in card for note in notes)  # counts and hashes only, never a row


def test_license_acknowledgment_is_recorded_for_the_audit(exported):
    import os

    out, report = exported
    ack = report["license_acknowledgment"]
    assert ack["license"] == "apache-2.0" and ack["accepted_by"] == "model.license_accepted: true"
    assert ack["obligations"] and len(ack["obligations_sha256"]) == 64
    entries = [json.loads(line) for line in Path(os.environ["PIPELINE_AUDIT_LOG"]).read_text().splitlines()]
    export_entries = [e for e in entries if e["command"] == "export" and e["exit_code"] == 0]
    assert export_entries[-1]["license_acknowledged"]["license"] == "apache-2.0"
    assert "merged/model.safetensors" in export_entries[-1]["outputs"]


def test_the_quickstart_adapter_is_reported_as_not_loading_in_vllm(exported):
    """The demo trains embed_tokens through modules_to_save, which vLLM's LoRA loader refuses."""
    out, report = exported
    check = report["serving"]["vllm"]
    assert check["loads"] is False and check["rank"] == 16
    assert check["reasons"][0].startswith("modules_to_save is embed_tokens: vLLM only loads adapters whose")
    assert report["serving"]["merged"] == "verified"
    assert report["serving"]["commands"] == {
        "vllm_merged": f"vllm serve {out / 'merged'} --served-model-name tiny",
        "tgi_merged": f"text-generation-launcher --model-id {out / 'merged'}",
    }
    for card in (out / "adapter" / "README.md", out / "merged" / "README.md"):
        section = card.read_text().split("## Serving")[1].split("## Intended use")[0]
        assert "vLLM: the adapter **does not load in vLLM as a LoRA adapter: modules_to_save is embed_tokens" in section
        assert "Instead: serve the merged export" in section and f"vllm serve {out / 'merged'}" in section


def test_export_prints_where_the_adapter_is_and_how_to_serve_it(trained_run, tmp_path, capsys):
    out = tmp_path / "x"
    assert export_cli(str(trained_run.run_dir), "--out", str(out), *ACCEPT) == 0
    printed = capsys.readouterr().out
    assert f"Adapter (PEFT format) written to {out / 'adapter'}\n" in printed and ".export-staging" not in printed
    assert "vLLM: the adapter does not load in vLLM as a LoRA adapter: modules_to_save is embed_tokens" in printed
    assert "The merged model, once `export --merge` has written and verified it:" in printed
    assert f"  vllm serve {out / 'merged'} --served-model-name tiny" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert (
        report["adapter_dir"] == str(out / "adapter") and report["serving"]["merged"] == "not written (export --merge)"
    )


def test_export_to_an_unreachable_store_is_queued_for_sync(run_copy, trained_run, tmp_path, capsys):
    """Export's MLflow calls go through tracking.Tracker: a store that is down queues them, as train's do."""
    from helpers import free_port

    from pipeline.recipe import load_recipe

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (run_copy / "summary.json").write_text(json.dumps({"mlflow_run_id": trained_run.mlflow_run_id}))
    recipe = load_recipe(trained_run.run_dir / "recipe.resolved.yaml", [f"tracking.uri={down}"])
    (run_copy / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    shutil.copytree(trained_run.run_dir / "validation", run_copy / "validation")
    out = tmp_path / "out"
    started = time.monotonic()
    assert export_cli(str(run_copy), "--out", str(out), *ACCEPT) == 0
    err = capsys.readouterr().err
    assert "is unreachable" in err
    # The audit entry's tags cannot reach the store either: found at once (not after MLflow's minutes of retries)
    # and queued with the rest for sync.
    assert "the audit entry is queued for sync" in err and time.monotonic() - started < 60
    report = json.loads((out / "export_report.json").read_text())
    pending = run_copy / "tracking" / "pending.jsonl"
    assert report["tracking"] == {"logged": False, "queued": str(pending)}
    ops = [json.loads(line) for line in pending.read_text().splitlines()]
    assert ops[0]["op"] == "start" and ops[0]["run_id"] == trained_run.mlflow_run_id and ops[0]["uri"] == down
    tags = next(op for op in ops if op["op"] == "tags")
    assert tags["export.model_name"] == "tiny" and tags["export.vllm_adapter"] == "refused"
    artifact = next(op for op in ops if op["op"] == "artifact")
    assert artifact["path"] == str((out / "export_report.json").resolve()) and artifact["artifact_path"] == "export"
    audit = [op for op in ops if op["op"] == "tags" and "audit.entry_hash" in op]
    kept = run_copy / "tracking" / Path(os.environ["PIPELINE_AUDIT_LOG"]).name  # a copy of the log as it was
    assert len(audit) == 1 and ops[-1] == {"op": "artifact", "path": str(kept), "artifact_path": "audit"}


def test_export_refuses_until_the_license_is_accepted(trained_run, tmp_path, capsys):
    code = export_cli(str(trained_run.run_dir), "--out", str(tmp_path / "x"))
    err = capsys.readouterr()
    assert code == 2
    assert "model.license_accepted" in err.err and "--set model.license_accepted=true" in err.err
    assert "Give recipients a copy of the Apache License 2.0" in err.out  # the obligations are printed first
    assert not (tmp_path / "x").exists()


def test_export_accepts_an_mlflow_run_id(trained_run, tmp_path, capsys):
    uri = trained_run.summary["tracking_uri"]
    code = export_cli(trained_run.mlflow_run_id, "--tracking-uri", uri, "--out", str(tmp_path / "x"))
    assert code == 2  # resolved to the run's directory, then stopped at the license gate
    assert str(trained_run.run_dir / "recipe.resolved.yaml") in capsys.readouterr().err
    assert export_cli("not-a-run", "--tracking-uri", uri) == 2
    assert "not-a-run: no such run directory, and not an MLflow run id" in capsys.readouterr().err
    assert export_cli("0" * 32, "--tracking-uri", uri) == 2  # the same lookup as evaluate --run (tracking.resolve_run)
    assert f"no MLflow run {'0' * 32} in {uri}" in capsys.readouterr().err


def _files(out: Path) -> dict:
    """Every file under out, relative path -> bytes."""
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _merged_versions(trained_run) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.summary["tracking_uri"])
    return len([v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")])


def _mlflow_report(trained_run, artifact: str, dest: Path) -> dict:
    """An export report among the training run's MLflow artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.summary["tracking_uri"])
    return json.loads(Path(client.download_artifacts(trained_run.mlflow_run_id, artifact, str(dest))).read_text())


def test_verification_catches_a_deliberately_wrong_merge(exported, trained_run, tmp_path, monkeypatch, capsys):
    from pipeline import export

    versions = _merged_versions(trained_run)
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)  # a previous, good export in the same place
    before = _files(out)
    good_report = _mlflow_report(trained_run, "export/export_report.json", tmp_path / "before")
    assert good_report.get("verification", {}).get("passed", True) is True  # a passed merge, or an adapter export
    right = export.lora_delta
    monkeypatch.setattr(export, "lora_delta", lambda a, b, scale, rows: -right(a, b, scale, rows))  # sign flipped
    code = export_cli(str(trained_run.run_dir), "--merge", "--out", str(out), "--register", *ACCEPT)
    assert code == 1
    err = capsys.readouterr().err
    assert "export verification failed" in err and "Nothing was registered" in err
    failed = out / "failed-verification"
    report = json.loads((failed / "export_report.json").read_text())
    v = report["verification"]
    assert not v["passed"] and v["next_token_agreement"] < 0.98 and v["max_abs_logit_diff"] > 1e-3
    assert report["merged_dir"] == str(failed / "merged") and "registered" not in report["tracking"]
    assert _merged_versions(trained_run) == versions  # --register did not register the failed merge
    card = (failed / "merged" / "README.md").read_text()
    assert "Verification FAILED" in card and f"next-token agreement {v['next_token_agreement']:.4f}" in card
    assert "Verified against" not in card
    assert "The merged model failed verification: do not serve it" in card and "vllm serve" not in card
    # Among the run's MLflow artifacts the last good export's report is as it was; the failed one goes beside it.
    assert _mlflow_report(trained_run, "export/export_report.json", tmp_path / "after") == good_report
    failed_report = _mlflow_report(trained_run, "export/failed-verification/export_report.json", tmp_path / "f")
    assert failed_report["verification"]["passed"] is False and failed_report["out"] == str(failed)
    # The previous good export is byte for byte as it was; no staging directory is left behind.
    assert {k: v for k, v in _files(out).items() if k.parts[0] != failed.name} == before
    assert not list(out.glob(".export-staging-*"))


def test_original_merge_base_goes_through_verification(trained_run, tmp_path):
    """Also: a recipe-set export.model_name is the registered name of the merged model."""
    args = [str(trained_run.run_dir), "--merge", "--merge-base", "original", "--out", str(tmp_path), "--register"]
    named = ["--set", "export.model_name=tiny-coder", "--set", "export.verify_examples=2"]
    assert export_cli(*args, "--set", "model.license_accepted=true", *named) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=trained_run.summary["tracking_uri"])
    (version,) = client.search_model_versions("name='tiny-coder'")
    assert report["tracking"]["registered"] == {"name": "tiny-coder", "version": str(version.version)}
    assert version.tags["export.merge_base"] == "original" and version.tags["base_model.license"] == "apache-2.0"
    v = report["verification"]
    assert v["passed"] and report["merge"]["merge_base"] == "original" and v["examples"] == 2 and v["positions"] > 2
    # The adapter never saw the 16-bit weights: the merged logits drift from the 4-bit reference by the NF4 error
    # (measured in benchmarks/merge.md), yet the next tokens agree.
    assert v["max_abs_logit_diff"] > 1e-3 and v["next_token_agreement"] >= v["min_next_token_agreement"] == 0.98
    assert "Merged into the original 16-bit base weights" in (tmp_path / "merged" / "README.md").read_text()


def test_the_recipe_agreement_threshold_decides_the_outcome(trained_run, tmp_path, monkeypatch):
    """The sign-flipped merge that fails at the default 0.98 passes when the recipe asks for no agreement."""
    from pipeline import export

    right = export.lora_delta
    monkeypatch.setattr(export, "lora_delta", lambda a, b, scale, rows: -right(a, b, scale, rows))
    lenient = ["--set", "export.min_next_token_agreement=0", "--set", "export.verify_examples=2"]
    assert export_cli(str(trained_run.run_dir), "--merge", "--out", str(tmp_path), *ACCEPT[:2], *lenient) == 0
    v = json.loads((tmp_path / "export_report.json").read_text())["verification"]
    assert v["passed"] and v["min_next_token_agreement"] == 0 and v["next_token_agreement"] < 0.98
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_verification_within_a_ram_budget_reads_the_merged_layers_from_disk(trained_run, tmp_path):
    """A RAM budget far below the tiny merged model (10 KiB for ~2 MB) forces every layer to disk: same numbers."""
    budget = ["--set", "export.verify_max_cpu_memory_gb=0.00001", "--set", "export.verify_examples=2"]
    assert export_cli(str(trained_run.run_dir), "--merge", "--out", str(tmp_path), *ACCEPT[:2], *budget) == 0
    v = json.loads((tmp_path / "export_report.json").read_text())["verification"]
    assert v["max_cpu_memory_gb"] == 0.00001 and set(v["merged_placement"]) == {"disk"}
    assert v["passed"] and v["next_token_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-4
    assert not list(tmp_path.rglob(".offload-*")) and not list(tmp_path.glob(".export-staging-*"))


def test_register_without_merge_is_refused(trained_run, tmp_path, capsys):
    assert export_cli(str(trained_run.run_dir), "--register", "--out", str(tmp_path / "x"), *ACCEPT) == 2
    assert "--register registers the merged model and needs --merge" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_export_failing_midway_leaves_the_previous_one_intact(exported, trained_run, tmp_path, monkeypatch):
    from pipeline import export

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # Adapter-only re-export dying after the adapter weights and tokenizer were written (at the model card).
    out = tmp_path / "adapter-only"
    assert export_cli(str(trained_run.run_dir), "--out", str(out), *ACCEPT) == 0
    before = _files(out)
    assert Path("adapter/adapter_model.safetensors") in before and Path("export_report.json") in before
    with monkeypatch.context() as patch:
        patch.setattr(export, "model_card", crash)
        with pytest.raises(OSError, match="No space left"):
            export.export_run(str(trained_run.run_dir), out=out, overrides=ACCEPT[1::2])
    assert _files(out) == before  # nothing truncated, nothing half-replaced, no staging left

    # A merged re-export dying after every shard was written (at config/tokenizer/generation config).
    out = tmp_path / "merged"
    shutil.copytree(exported[0], out)
    before = _files(out)
    monkeypatch.setattr(export, "write_model_files", crash)
    with pytest.raises(OSError, match="No space left"):
        export.export_run(str(trained_run.run_dir), merge=True, out=out, overrides=ACCEPT[1::2])
    assert _files(out) == before


def test_model_card_renders_the_baseline_and_cost_as_tables(trained_run, tmp_path):
    from pipeline import licenses
    from pipeline.card import model_card
    from pipeline.recipe import load_recipe

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "validation", run / "validation")
    metrics = json.loads((trained_run.run_dir / "eval" / "metrics.json").read_text())
    metrics["systems"]["baseline"] = dict(metrics["systems"]["finetuned"], micro_f1=0.5)
    metrics["comparison"] = {"metric": "micro_f1", "a": "finetuned", "b": "baseline", "difference": 0.25,
                             "ci95": [0.1, 0.4], "verdict": "better"}  # fmt: skip
    hosted = {"throughput_tokens_per_s": 1000.0, "throughput_source": "given", "seconds_per_case": 0.5,
              "cost_per_1m_tokens": 0.5556, "cost_per_1000_cases": 0.2778, "monthly_gpu_cost": 1460.0,
              "capacity_cases_per_month": 5256000.0}  # fmt: skip
    api = {"cost_per_1m_tokens": 3.1818, "cost_per_1000_cases": 3.5, "cost_per_case": 0.0035}
    metrics["cost"] = {"gpu_price_per_hour": 2.0, "hours_per_month": 730, "self_hosted": hosted, "api": api,
                       "break_even_cases_per_month": 417143.0, "one_gpu_suffices": True}  # fmt: skip
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    recipe = load_recipe(trained_run.run_dir / "recipe.resolved.yaml")
    lic = licenses.lookup("apache-2.0")
    ack = licenses.acknowledgment(lic, "apache-2.0", "model.license", "tiny")
    card = model_card(recipe, run, model_name="tiny", kind="adapter", ack=ack, lic=lic, mlflow_run_id="abc")
    assert "| baseline | 0.5 |" in card and "**better**" in card
    assert "| | self-hosted fine-tune | baseline API |" in card
    assert "| $ per 1,000 cases | $0.2778 | $3.5000 |" in card and "breaks even at 417,143 cases a month" in card
    assert "{" not in card.split("### Cost")[1] and "None" not in card.split("### Cost")[1]  # no raw dicts


@pytest.fixture()
def run_copy(trained_run, tmp_path):
    """A run directory holding only what export reads, safe to damage."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run.run_dir / "recipe.resolved.yaml", run)
    shutil.copytree(trained_run.run_dir / "adapter", run / "adapter")
    return run


def test_corrupt_or_missing_adapter_names_the_file(run_copy, capsys):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated copy
    assert export_cli(str(run_copy), *ACCEPT) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "corrupt or truncated" in err and "re-run training" in err
    (run_copy / "adapter" / "adapter_config.json").unlink()
    assert export_cli(str(run_copy), *ACCEPT) == 2
    assert "adapter_config.json: adapter config not found" in capsys.readouterr().err


def test_corrupt_base_shard_names_the_file(trained_run, tiny_assets, tmp_path):
    from pipeline.export import stream_merge
    from pipeline.recipe import QuantizationSection
    from pipeline.weights import ExportInputError, load_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_assets["model"], base)
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ExportInputError, match="model.safetensors: base model shard is corrupt or truncated"):
        stream_merge(
            base, load_adapter(trained_run.run_dir / "adapter"), tmp_path / "out", "original", QuantizationSection()
        )


def _peft_merged(model_dir: Path, adapter_dir: Path, dtype):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _read_all(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_streaming_merge_equals_peft_merge_with_trained_embeddings(trained_run, tiny_assets, tmp_path):
    import torch

    from pipeline.export import stream_merge
    from pipeline.recipe import QuantizationSection
    from pipeline.weights import load_adapter

    stream_merge(
        tiny_assets["model"], load_adapter(trained_run.run_dir / "adapter"), tmp_path, "original", QuantizationSection()
    )
    ours = _read_all(tmp_path)
    reference = _peft_merged(tiny_assets["model"], trained_run.run_dir / "adapter", "float32")
    params = dict(reference.named_parameters())
    assert set(ours) == set(params)  # incl. lm_head, stored separately from the trained embed_tokens
    for name, tensor in params.items():
        torch.testing.assert_close(ours[name], tensor.detach(), rtol=1e-5, atol=1e-6, msg=name)


def untied_llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
    )


def test_streaming_merge_equals_peft_merge_bf16_multi_shard(tmp_path):
    """A bf16 base in several shards with a random (non-zero) adapter: shards, dtype and values match peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.export import stream_merge
    from pipeline.recipe import QuantizationSection
    from pipeline.weights import load_adapter

    torch.manual_seed(0)
    config = untied_llama(vocab=256, hidden=64, intermediate=128, layers=3, heads=2)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "base", max_shard_size="60KB"
    )
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    assert len(shards) >= 3
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), lora)
    peft_model.save_pretrained(tmp_path / "adapter")

    report = stream_merge(
        tmp_path / "base", load_adapter(tmp_path / "adapter"), tmp_path / "out", "original", QuantizationSection()
    )
    assert report["shards"] == len(shards) and report["dtypes"] == {"BF16": report["tensors"]} and report["merged"] == 9
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [p.name for p in shards]
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ours = _read_all(tmp_path / "out")
    reference = dict(_peft_merged(tmp_path / "base", tmp_path / "adapter", "bfloat16").named_parameters())
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.bfloat16
        # Both round once to bf16 (bit-identical in benchmarks/merge.md); allow one bf16 ulp (2^-8 relative).
        torch.testing.assert_close(ours[name].float(), tensor.detach().float(), rtol=2**-7, atol=1e-3, msg=name)


def test_dequantized_merge_base_is_exactly_what_the_4bit_model_computes_with(trained_run, tiny_assets):
    """nf4_roundtrip(W) equals the dequantized Linear4bit weight transformers + bitsandbytes built in training."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors.torch import load_file

    from pipeline.export import model_layout, nf4_roundtrip
    from pipeline.model import load_base
    from pipeline.recipe import load_recipe

    recipe = load_recipe(trained_run.run_dir / "recipe.resolved.yaml")
    model = load_base(recipe, tiny_assets["model"], "cpu")
    original = load_file(tiny_assets["model"] / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {f"{n}.weight" for n in layers} == model_layout(tiny_assets["model"]).quantized
    for name, module in layers.items():
        seen = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert torch.equal(nf4_roundtrip(original[f"{name}.weight"], recipe.quantization), seen), name


RSS_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.export import model_layout, stream_merge
from pipeline.weights import load_adapter, peak_rss_mb, reset_peak_rss
from pipeline.recipe import QuantizationSection
base, adapter, out = map(Path, sys.argv[1:4])
model_layout(base)  # imports and the meta model, before the baseline
loaded = load_adapter(adapter)
assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"  # import transients would hide the merge's peak
before = peak_rss_mb()
report = stream_merge(base, loaded, out, "original", QuantizationSection())
print(json.dumps({{"before": before, "after": peak_rss_mb(), "shards": report["shards"], "adapter": loaded.nbytes}}))
"""


def test_peak_memory_of_the_merge_is_bounded_by_a_shard_not_the_model(tmp_path):
    """Merge a 96 MB, 8-shard model in a fresh process: peak RSS grows by less than one shard."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = untied_llama(vocab=4096, hidden=512, intermediate=1024, layers=8, heads=8)
    base = tmp_path / "base"
    base.mkdir()
    config.save_pretrained(base)
    h, i, layers = 512, 1024, 8
    weight_map, adapter = {}, {}
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h)}
    mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for layer in range(layers):  # one shard per layer: 2.6M params x 4 bytes = 10.5 MB
        tensors = {f"model.layers.{layer}.input_layernorm.weight": torch.ones(h)}
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(h)
        for group, items in (("self_attn", shapes), ("mlp", mlp)):
            for name, shape in items.items():
                module = f"model.layers.{layer}.{group}.{name}"
                tensors[f"{module}.weight"] = torch.randn(shape) * 0.02
                adapter[f"base_model.model.{module}.lora_A.weight"] = torch.randn(8, shape[1])
                adapter[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], 8)
        shard = f"model-{layer + 1:05d}-of-00009.safetensors"
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    last = "model-00009-of-00009.safetensors"  # embeddings and head: 2 x 4096 x 512 x 4 bytes = 16.8 MB
    extra = {
        "model.embed_tokens.weight": torch.randn(4096, h),
        "lm_head.weight": torch.randn(4096, h),
        "model.norm.weight": torch.ones(h),
    }
    save_file(extra, base / last, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(extra, last))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "adapter").mkdir()
    save_file(adapter, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"})
    )
    total_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    largest_shard_mb = max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20

    script = RSS_SCRIPT.format(root=str(ROOT))
    command = [sys.executable, "-c", script, str(base), str(tmp_path / "adapter"), str(tmp_path / "out")]
    # glibc keeps freed allocations below its dynamic mmap threshold (up to 32 MB) in the heap. A real model's
    # tensors are far above it (a 70B's are 100 MB to 2 GB) and always come from and go back to the OS; a fixed
    # 1 MB threshold gives this 8 MB-tensor model the same behaviour.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    grew = measured["after"] - measured["before"]
    assert measured["shards"] == 9 and total_mb > 90
    # Streaming holds one tensor (+ its fp32 update) at a time: far below the model, below the largest shard.
    assert grew < largest_shard_mb, (grew, largest_shard_mb, total_mb)
