"""The end-to-end privacy guarantee (docs/compliance.md): a planted SSN and planted secrets never leave.

One tiny real job on splits with planted PHI, with a fake API key, a fake Hugging Face token and a fake MLflow
password in the environment: ``train`` (2 optimizer steps of the 4-bit model), ``evaluate`` with the commercial
baseline sending data to a local OpenAI-compatible server on 127.0.0.1, then ``export --merge``. Afterwards
every byte the job wrote (run directory, export, MLflow database and artifacts, baseline cache, audit log),
everything it printed, and every request the baseline server received are scanned for the planted values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_llm import FakeLLM

from pipeline.cli import main

SSN = "536-22-8726"
PHONE = "617-726-2000"
SECRETS = {
    "OPENAI_API_KEY": "sk-PLANTED0key0that0must0never0be0written0anywhere",
    "HF_TOKEN": "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",
    "MLFLOW_TRACKING_PASSWORD": "PLANTED-mlflow-password-0451",
}


@pytest.fixture
def baseline_server():
    server = FakeLLM("openai", answer=lambda messages: "E11.9")
    yield server
    server.close()


def test_planted_phi_and_secrets_never_leave_train_evaluate_or_export(
    tmp_path, tiny_assets, recipe_with, baseline_server, monkeypatch, capfd
):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    phi = f" Patient SSN {SSN}, phone {PHONE}."
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (tiny_assets["data"] / f"{split}.jsonl").read_text().splitlines()]
        rows = rows[:48] if split == "train" else rows[:10]
        for row in rows[:2]:
            row["note"] += phi
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_with(
        "recipe.yaml",
        data={"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        training={"max_steps": 2, "logging_steps": 1},
        eval={"batch_size": 10, "max_new_tokens": 4},
        baseline={
            "provider": "openai",
            "model": "gpt-test",
            "base_url": baseline_server.base_url,
            "api_key_env": "OPENAI_API_KEY",
            "send_data": True,
            "few_shot": 2,
            "price_input_per_1m": 2.5,
            "price_output_per_1m": 10.0,
        },
        tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "compliance"},
        model={"license_accepted": True},
    )
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run_dir)]) == 0
    assert main(["evaluate", str(recipe), "--run", str(run_dir), "--systems", "base,finetuned,baseline"]) == 0
    assert (
        main(
            ["export", str(run_dir), "--merge", "--out", str(tmp_path / "export"), "--set", "export.verify_examples=2"]
        )
        == 0
    )
    printed = capfd.readouterr()

    # The baseline really was called with the eval rows (and few-shot train rows): by train at its end (the
    # recipe has a baseline section), and evaluate then took all 10 answers from the cache ...
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["baseline"]["status"] == "ok" and metrics["baseline"]["answers_from_cache"] == 10
    assert metrics["baseline"]["rows_sent"] == 0 and len(baseline_server.requests) == 10
    sent_log = [json.loads(line) for line in (run_dir / "eval" / "baseline_sent.jsonl").read_text().splitlines()]
    assert sum(entry["split"] == "eval" for entry in sent_log) == 10
    sent = json.dumps([r["body"] for r in baseline_server.requests])
    # ... with the planted values replaced by typed placeholders before anything left the process.
    assert "<US_SSN>" in sent and "<PHONE_NUMBER>" in sent
    assert SSN not in sent and PHONE not in sent
    assert all(SECRETS["HF_TOKEN"] not in json.dumps(r["headers"]) for r in baseline_server.requests)

    audit_log = Path(os.environ["PIPELINE_AUDIT_LOG"])
    # The audit trail reaches the reviewer: train, evaluate and export each attach the log to the run's MLflow
    # run, and the run's tag holds the hash of the latest entry (export's).
    run_id = json.loads((run_dir / "tracking" / "run.json").read_text())["mlflow_run_id"]
    entries = [json.loads(line) for line in audit_log.read_text().splitlines()]
    mine = [e for e in entries if e.get("mlflow_run_id") == run_id]
    assert [e["command"] for e in mine] == ["train", "evaluate", "export"]
    assert mine[0]["exit_code"] == 0 and "adapter/adapter_model.safetensors" in mine[0]["outputs"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert client.get_run(run_id).data.tags["audit.entry_hash"] == mine[-1]["hash"]
    # The log is attached under its own file name (the suite points PIPELINE_AUDIT_LOG at temporary files).
    assert [a.path for a in client.list_artifacts(run_id, "audit")] == [f"audit/{audit_log.name}"]
    attached = Path(client.download_artifacts(run_id, f"audit/{audit_log.name}", str(tmp_path / "dl"))).read_text()
    assert all(e["hash"] in attached for e in mine)

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("train.jsonl", "eval.jsonl")]
    written += [audit_log, audit_log.with_name("audit.head")]
    assert any(p.suffix == ".db" for p in written) and any("mlartifacts" in p.parts for p in written)
    assert any(p.name == "model.safetensors" for p in written) and any(p.name == "predictions.jsonl" for p in written)
    planted = {"SSN": SSN, "phone": PHONE, **SECRETS}
    for path in written:
        data = path.read_bytes()
        for name, value in planted.items():
            assert value.encode() not in data, f"{name} found in {path}"
    for stream, text in (("stdout", printed.out), ("stderr", printed.err)):
        for name, value in planted.items():
            assert value not in text, f"{name} printed on {stream}"
