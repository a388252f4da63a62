"""``export RUN_ID`` from a remote MLflow store: allowed by the recipe the user names (or the host), else refused."""

import json
import os
import subprocess
import sys

from conftest import ROOT

# The guard main() installs, but refusing loopback too, so the remote-store rule is exercised on a loopback server
# without ever addressing another machine (as tests/test_privacy.py does).
GUARDED_EXPORTS = r"""
import json, sys
from pipeline import egress

egress._GUARD = egress.EgressGuard((), allow_loopback=False)
sys.addaudithook(egress._GUARD.audit_hook)
from pipeline.cli import main

for name, argv in json.loads(sys.argv[1]):
    egress._GUARD.decisions.clear()  # one command per process in real use: each audit entry its own decisions
    print("RESULT", name, main(argv), flush=True)
"""


def _remote_run(url: str, run_dir) -> str:
    """A run in the remote store holding what a run trained on another machine logs (no run directory here)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.create_experiment("remote-export")
    run_id = client.create_run(experiment, run_name="trained-elsewhere").info.run_id
    for name in ("adapter", "validation", "eval"):
        client.log_artifacts(run_id, str(run_dir / name), artifact_path=name)
    for name in ("recipe.resolved.yaml", "summary.json"):
        client.log_artifact(run_id, str(run_dir / name))
    client.set_terminated(run_id)
    return run_id


def test_export_of_a_run_id_in_a_remote_store_follows_the_allowed_hosts_rule(
    trained_run, recipe_with, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    url = mlflow_server
    run_id = _remote_run(url, trained_run.run_dir)
    recipe = recipe_with("remote.yaml", tracking={"uri": url}, privacy={"allowed_hosts": ["127.0.0.1"]})
    accept = ["--set", "model.license_accepted=true"]
    cases = [
        ("refused", ["--tracking-uri", url, "--out", str(tmp_path / "a")]),
        ("recipe", ["--recipe", str(recipe), "--out", str(tmp_path / "b")]),
        ("host", ["--tracking-uri", url, "--allowed-host", "127.0.0.1", "--out", str(tmp_path / "c")]),
    ]
    cases = [(name, ["export", run_id, *args, *accept]) for name, args in cases]
    log = tmp_path / "audit.jsonl"
    env = {
        **os.environ,
        "PIPELINE_AUDIT_LOG": str(log),
        "PYTHONPATH": str(ROOT),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-c", GUARDED_EXPORTS, json.dumps(cases)],
        cwd=tmp_path,  # a downloaded run goes to runs/_mlflow/<id> under the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert "RESULT refused 1" in out and "RESULT recipe 0" in out and "RESULT host 0" in out, result.stderr[-3000:]
    # Without the recipe or the host, the store is refused before any packet, and the error says what to name.
    assert f"refused outbound connection to 127.0.0.1:{url.rsplit(':', 1)[1]}" in result.stderr
    assert "export RUN_ID --recipe RECIPE" in result.stderr and "--allowed-host HOST" in result.stderr
    assert not (tmp_path / "a").exists()
    for name in ("b", "c"):
        report = json.loads((tmp_path / name / "export_report.json").read_text())
        assert report["mlflow_run_id"] == run_id and report["tracking"]["logged"] is True
        # Fetched from the store into runs/_mlflow/<run id> of the working directory.
        assert report["run_dir"] == f"runs/_mlflow/{run_id}"
        assert (tmp_path / report["run_dir"] / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
    client = MlflowClient(tracking_uri=url)
    assert client.get_run(run_id).data.tags["export.model_name"] == "tiny"
    assert [a.path for a in client.list_artifacts(run_id, "export")] == ["export/export_report.json"]
    refused, by_recipe, by_host = (json.loads(line) for line in log.read_text().splitlines())
    assert refused["exit_code"] == 1 and not any(d["allowed"] for d in refused["egress"].values())
    for entry in (by_recipe, by_host):
        assert entry["exit_code"] == 0 and entry["egress"]
        assert all(
            d["allowed"] and d["reason"] == "privacy.allowed_hosts: 127.0.0.1" for d in entry["egress"].values()
        ), entry["egress"]
