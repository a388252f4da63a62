"""Egress guard and offline environment (``egress``), and the PII scanner (``pii``). Only loopback addresses are
ever connected to here."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.egress import EgressBlocked, EgressGuard


@pytest.mark.parametrize(
    "host,allowed",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("93.184.216.34", False),
        ("2001:db8::1", False),
        ("api.openai.com", False),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("mlflow.internal", True),
        ("10.20.30.40", True),  # the address the allowed name resolves to (below)
        ("10.20.30.41", False),
    ],
)
def test_decision_function(host, allowed, monkeypatch):
    import socket

    lookups = []

    def fake_getaddrinfo(name, port, *args, **kwargs):
        # No DNS here: the allowed name resolves to a made-up private address, nothing leaves the machine.
        lookups.append(name)
        if name == "mlflow.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.20.30.40", 0))]
        raise socket.gaierror(socket.EAI_NONAME, name)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    guard = EgressGuard(("10.1.0.0/16", "mlflow.internal"))
    assert guard.decide(host)[0] is allowed
    assert set(lookups) <= {"mlflow.internal"}  # only names on the allow-list are ever resolved


def test_validate_and_plan_name_every_host_the_guard_would_refuse(recipe_with, tmp_path, monkeypatch):
    """tracking.uri, baseline.base_url and judge.base_url (the last two only when they would send) are checked
    against privacy.allowed_hosts before any run, from the list alone: nothing is looked up or contacted."""
    import socket

    from helpers import run_main

    def no_lookup(*_args, **_kwargs):
        raise AssertionError("the host check must not resolve names")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    path = recipe_with(
        "hosts.yaml",
        tracking={"uri": "http://10.1.2.3:5000"},
        baseline={"provider": "openai", "model": "gpt-4o", "send_data": True, "base_url": "https://llm.corp/v1"},
        judge={"provider": "openai", "model": "judge", "base_url": "http://judge.internal:8000/v1", "send_data": False},
        privacy={"allowed_hosts": ["llm.corp"]},
    )
    for command in ("validate", "plan"):
        result = run_main(command, str(path), "--run-dir", str(tmp_path / command))
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if "egress guard will refuse" in line]
        assert len(lines) == 1, result.stderr  # llm.corp is allowed; the judge sends nothing
        assert "tracking.uri: 10.1.2.3 is not loopback" in lines[0]
        assert "privacy: {allowed_hosts: [10.1.2.3]}" in lines[0]


def test_the_test_sandbox_refuses_names_and_addresses_beyond_loopback():
    import socket

    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("mlflow.internal", 443)
    with pytest.raises(OSError), socket.socket() as sock:
        sock.connect(("192.0.2.1", 9))  # TEST-NET-1: refused by the sandbox before the system call
    assert socket.getaddrinfo("127.0.0.1", 80)


def test_refusal_names_the_destination_and_the_recipe_key():
    guard = EgressGuard(())
    with pytest.raises(EgressBlocked) as err:
        guard.check("socket.connect", "93.184.216.34", 443)
    message = str(err.value)
    assert "93.184.216.34:443" in message and "privacy.allowed_hosts" in message
    assert guard.decisions["93.184.216.34:443"]["allowed"] is False
    assert guard.decisions["93.184.216.34:443"]["count"] == 1


GUARDED_CONNECT = r"""
import socket, sys
from pipeline.egress import EgressBlocked, EgressGuard

open_server = socket.create_server(("127.0.0.1", 0))
closed_server = socket.create_server(("127.0.0.2", 0))
closed_server.settimeout(1.0)
guard = EgressGuard(("127.0.0.1",), allow_loopback=False)   # 127.0.0.2 is left off the allow-list
sys.addaudithook(guard.audit_hook)

socket.create_connection(open_server.getsockname(), timeout=5).close()
print("allowed connect ok")
try:
    socket.create_connection(closed_server.getsockname(), timeout=5)
    print("NOT BLOCKED")
except EgressBlocked as exc:
    print("blocked:", exc)
try:
    closed_server.accept()
    print("PACKET REACHED THE SERVER")
except TimeoutError:
    print("server saw nothing")
print([d["allowed"] for d in guard.decisions.values()])
"""


def test_guard_refuses_before_the_connection_is_made():
    result = subprocess.run(
        [sys.executable, "-c", GUARDED_CONNECT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    out = result.stdout
    assert "allowed connect ok" in out, result.stderr
    assert "blocked: egress guard: refused outbound connection to 127.0.0.2:" in out
    assert "server saw nothing" in out
    assert "NOT BLOCKED" not in out and "PACKET REACHED" not in out


def test_every_command_runs_offline_and_guarded_with_the_recipe_allow_list():
    code = (
        "import os\nfrom pipeline.cli import main\n"
        "main(['plan', 'recipes/quickstart.yaml', '--set', 'privacy.allowed_hosts=[10.9.9.9]'])\n"
        "from pipeline import egress\n"
        "print('GUARD', egress._GUARD.allowed_hosts, egress._GUARD.decide('10.9.9.9')[0],"
        " egress._GUARD.decide('10.9.9.8')[0])\n"
        "print('ENV', os.environ['HF_HUB_OFFLINE'], os.environ['MLFLOW_DISABLE_TELEMETRY'],"
        " os.environ['HF_HUB_DISABLE_TELEMETRY'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "MLFLOW_DISABLE_TELEMETRY": "false"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert "GUARD ('10.9.9.9',) True False" in result.stdout, result.stderr
    assert "ENV 1 true 1" in result.stdout


def test_secrets_are_redacted_from_text_bound_for_tracking():
    from pipeline.egress import redact_secrets

    assert redact_secrets("https://alice:s3cr3t@mlflow.internal:5000/x") == "https://alice:***@mlflow.internal:5000/x"
    assert redact_secrets("http://h/api?token=abc&x=1&api_key=zz") == "http://h/api?token=***&x=1&api_key=***"
    assert redact_secrets("sqlite:///mlruns.db") == "sqlite:///mlruns.db"


@pytest.mark.parametrize(
    "override,instead",
    [
        ("tracking.uri=https://bob:hunter2@mlflow.internal/", "MLFLOW_TRACKING_PASSWORD"),
        ("tracking.uri=https://mlflow.internal/?token=hunter2", "MLFLOW_TRACKING_PASSWORD"),
        ("baseline={provider: openai, model: m, base_url: 'http://u:hunter2@127.0.0.1:9/v1'}", "api_key_env"),
    ],
)
def test_a_recipe_refuses_credentials_in_urls_without_echoing_them(override, instead):
    from pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [override])
    message = "\n".join(err.value.errors)
    assert "holds a credential" in message and instead in message
    assert "hunter2" not in message
    # A URL without credentials is fine.
    load_recipe(ROOT / "recipes" / "quickstart.yaml", ["tracking.uri=https://mlflow.internal/"])


def test_audit_argv_never_carries_a_url_password(tmp_path):
    log = tmp_path / "audit.jsonl"
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        "sys.argv = ['pipeline', 'validate', 'recipes/quickstart.yaml', '--set', "
        "'tracking.uri=https://bob:hunter2@mlflow.internal/', '--run-dir', sys.argv[1]]\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PIPELINE_AUDIT_LOG": str(log)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "holds a credential" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    entry = json.loads(log.read_text().splitlines()[-1])
    assert "hunter2" not in json.dumps(entry) and "tracking.uri=https://bob:***@mlflow.internal/" in entry["argv"]


def test_ui_refuses_to_bind_beyond_loopback():
    import signal

    # Its own process group: if the refusal were ever broken, the MLflow server it would start (with worker
    # processes) is killed as a whole instead of outliving the test on 0.0.0.0.
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "ui", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("pipeline ui --host 0.0.0.0 started a server instead of refusing")
    assert process.returncode == 2 and "binds loopback addresses only" in stderr


# --------------------------------------------------------------------------------------------------
# PII/PHI detection (pipeline.pii: Presidio pattern recognizers, offline)


def test_pii_scanner_finds_each_entity_and_never_touches_the_network(monkeypatch):
    import socket

    from pipeline.pii import PiiScanner, redact

    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args}")

    # tldextract's default extractor would fetch the public-suffix list here, for the e-mail domain check.
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    scanner = PiiScanner()  # a fresh one, so its construction is under the patch too
    text = (
        "Pt 67M. SSN 536-22-8726. Cell (617) 726-2000. Mail jane.doe@mgh.harvard.edu. Card 4111 1111 1111 1111. "
        "DOB: March 14, 1962. MRN# A00412345. BP 130/80, seen 3 months ago."
    )
    findings = scanner.scan(text)
    assert [f.entity for f in findings] == [
        "US_SSN",
        "PHONE_NUMBER",
        "EMAIL_ADDRESS",
        "CREDIT_CARD",
        "DATE_OF_BIRTH",
        "MEDICAL_RECORD_NUMBER",
    ]
    assert redact(text, findings) == (
        "Pt 67M. SSN <US_SSN>. Cell <PHONE_NUMBER>. Mail <EMAIL_ADDRESS>. Card <CREDIT_CARD>. "
        "DOB: <DATE_OF_BIRTH>. MRN# <MEDICAL_RECORD_NUMBER>. BP 130/80, seen 3 months ago."
    )
    assert scanner.scan("Pt 67M with essential hypertension, BP 130/80, follow up in 3 months.") == []
    # No spaCy model ships with pipeline: PERSON is reported unavailable, not silently claimed.
    if scanner.model is None:
        assert "PERSON" in scanner.unavailable and "PERSON" not in scanner.entities


def test_pii_detector_is_not_imported_by_light_modules():
    code = (
        "import sys, pipeline.contracts, pipeline.data, pipeline.egress, pipeline.pii; "
        "print('presidio_analyzer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Commands that take a run (sync, export) are guarded with the run's own allow-list

RUN_COMMANDS = r"""
import sys
from pipeline import egress

# The guard main() would install, but with loopback refused too, so that a refusal can be watched on a
# loopback address (127.0.0.2) without ever addressing another machine.
egress._GUARD = egress.EgressGuard((), allow_loopback=False)
sys.addaudithook(egress._GUARD.audit_hook)
from pipeline.cli import main

for argv in (["sync", sys.argv[1]], ["export", sys.argv[1]]):
    code = main(argv)
    print("AFTER", argv[0], code, egress._GUARD.allowed_hosts, egress._GUARD.decide("127.0.0.3")[0],
          egress._GUARD.decide("127.0.0.2")[0], flush=True)
"""


def test_sync_and_export_apply_the_run_allow_list_and_their_audit_entries_record_recipe_inputs_and_refusals(tmp_path):
    import socket

    from pipeline.recipe import load_recipe

    # A run allowed to reach 127.0.0.3 only, whose queued tracking calls are meant for 127.0.0.2.
    run = tmp_path / "run"
    (run / "tracking").mkdir(parents=True)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["privacy.allowed_hosts=[127.0.0.3]"])
    (run / "recipe.resolved.yaml").write_text(recipe.to_yaml())
    (run / "validation").mkdir()
    splits = {k: {"path": getattr(recipe.data, k), "sha256": k[0] * 64} for k in ("train", "eval")}
    (run / "validation" / "report.json").write_text(json.dumps({"splits": splits}))
    server = socket.create_server(("127.0.0.2", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    start = {"op": "start", "uri": f"http://127.0.0.2:{port}", "experiment": "e", "run_name": "r", "run_id": None}
    (run / "tracking" / "pending.jsonl").write_text(json.dumps(start) + "\n")
    log = tmp_path / "audit.jsonl"
    env = {**os.environ, "PIPELINE_AUDIT_LOG": str(log), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = subprocess.run(
        [sys.executable, "-c", RUN_COMMANDS, str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    with pytest.raises(TimeoutError):
        server.accept()  # the refused connection never reached the server
    server.close()
    # The run's allow-list is in force once each command has started: 127.0.0.3 allowed, 127.0.0.2 not.
    assert "AFTER sync 1 ('127.0.0.3',) True False" in result.stdout, result.stderr[-3000:]
    assert "AFTER export 2 ('127.0.0.3',) True False" in result.stdout, result.stderr[-3000:]
    assert f"sync failed, {run / 'tracking' / 'pending.jsonl'} is kept" in result.stderr
    assert f"EgressBlocked: egress guard: refused outbound connection to 127.0.0.2:{port}" in result.stderr
    sync_entry, export_entry = (json.loads(line) for line in log.read_text().splitlines())
    refused = sync_entry["egress"][f"127.0.0.2:{port}"]
    assert refused["allowed"] is False and refused["count"] >= 1 and "allowed_hosts" in refused["reason"]
    # Both entries name the run's recipe and its hash (the resolved recipe of the run, not a recipe argument).
    for entry in (sync_entry, export_entry):
        assert entry["recipe"] == str(run / "recipe.resolved.yaml") and len(entry["recipe_sha256"]) == 64
        # ... and the input data hashes the run's validation recorded.
        assert entry["inputs"][f"data.train:{recipe.data.train}"] == "t" * 64
        assert entry["inputs"][f"data.eval:{recipe.data.eval}"] == "e" * 64


def test_runs_without_a_recipe_refuses_a_remote_store_up_front_and_says_what_allows_it():
    # The store's host is decided before MLflow is asked (no name lookup: nothing is on the allow-list).
    env = {**os.environ, "MLFLOW_TRACKING_URI": "https://mlflow.internal.example:5000"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "runs"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "refused outbound connection to mlflow.internal.example:5000" in result.stderr
    assert "pass the recipe (runs RECIPE)" in result.stderr
