import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import run_cli

from pipeline.audit import append, verify


def make_log(tmp_path, n=4):
    log = tmp_path / "audit.jsonl"
    for i in range(n):
        append(log, {"command": "validate", "argv": [str(i)], "exit_code": 0})
    return log


def lines_of(log):
    return log.read_text().splitlines()


def test_intact_chain_verifies(tmp_path):
    log = make_log(tmp_path)
    assert verify(log) == []
    entries = [json.loads(line) for line in lines_of(log)]
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[1]["prev"] == entries[0]["hash"] and entries[0]["prev"] == "0" * 64
    assert {"time", "user", "host", "command", "argv", "exit_code"} <= set(entries[0])


def test_edited_entry_is_detected(tmp_path):
    log = make_log(tmp_path)
    lines = lines_of(log)
    entry = json.loads(lines[1])
    entry["exit_code"] = 1
    lines[1] = json.dumps(entry, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    assert any(":2: entry 1 was edited" in p for p in verify(log))


@pytest.mark.parametrize("how", ["remove", "reorder", "truncate"])
def test_removed_reordered_or_truncated_entries_are_detected(tmp_path, how):
    log = make_log(tmp_path)
    lines = lines_of(log)
    if how == "remove":
        del lines[1]
    elif how == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:-1]
    log.write_text("\n".join(lines) + "\n")
    problems = verify(log)
    assert problems
    if how == "truncate":
        assert "entries were removed from the end" in problems[-1]
    else:
        assert "does not follow the previous entry" in " ".join(problems)


def test_every_command_is_audited_and_verify_exits_1_on_tampering(tmp_path, tiny_assets):
    env_log = tmp_path / "audit.jsonl"
    session_log = os.environ["PIPELINE_AUDIT_LOG"]
    os.environ["PIPELINE_AUDIT_LOG"] = str(env_log)  # inherited by the subprocesses below
    try:
        data = tiny_assets["data"]
        assert (
            run_cli(
                "validate",
                "recipes/quickstart.yaml",
                "--data-only",  # a fresh clone has no demo base until make demo
                "--set",
                f"data.train={data / 'train.jsonl'}",
                "--set",
                f"data.eval={data / 'eval.jsonl'}",
                "--run-dir",
                str(tmp_path / "v"),
            ).returncode
            == 0
        )
        assert run_cli("validate", "recipes/quickstart.yaml", "--set", "lora.alpah=1").returncode == 2
        entries = [json.loads(line) for line in lines_of(env_log)]
        assert [(e["command"], e["exit_code"]) for e in entries] == [("validate", 0), ("validate", 2)]
        first = entries[0]
        assert first["recipe_sha256"] and any(k.startswith("data.train:") for k in first["inputs"])
        report = tmp_path / "v" / "validation" / "report.json"
        from pipeline.rundir import sha256_file

        assert first["outputs"]["validation/report.json"] == sha256_file(report)
        assert first["inputs"][f"data.train:{data / 'train.jsonl'}"] == sha256_file(data / "train.jsonl")
        ok = run_cli("audit", "verify")
        assert ok.returncode == 0 and "chain intact" in ok.stdout
        lines = lines_of(env_log)
        env_log.write_text("\n".join(lines[1:]) + "\n")  # drop the first entry
        bad = run_cli("audit", "verify")
        assert bad.returncode == 1 and "does not follow the previous entry" in bad.stderr
    finally:
        os.environ["PIPELINE_AUDIT_LOG"] = session_log  # the later tests append to the session's log again


# --------------------------------------------------------------------------------------------------
# A damaged log is reported, never a traceback; and a command still runs when its entry cannot be chained


def _damage(log, how):
    lines = lines_of(log)
    if how == "not json":
        lines[1] = lines[1][:40]  # a line cut short
    elif how == "seq not a number":
        entry = json.loads(lines[1])
        entry["seq"] = "one"
        lines[1] = json.dumps(entry, sort_keys=True)
    elif how == "not an object":
        lines[1] = "[1, 2]"
    if how == "corrupt head":
        log.with_name("audit.head").write_text("{not json")
    elif how == "empty":
        log.write_text("")
    else:
        log.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "how,expected",
    [
        ("not json", "audit.jsonl:2: not an audit entry"),
        ("seq not a number", "audit.jsonl:2: not an audit entry"),
        ("not an object", "audit.jsonl:2: not an audit entry"),
        ("corrupt head", "audit.head: not a head record"),
        ("empty", "the log is empty"),
    ],
)
def test_a_damaged_log_is_reported_with_the_line(tmp_path, how, expected):
    log = make_log(tmp_path)
    _damage(log, how)
    problems = verify(log)
    assert any(expected in p for p in problems), problems


def test_audit_verify_exits_1_on_damage_and_commands_still_run_when_the_last_line_is_corrupt(tmp_path):
    log = make_log(tmp_path)
    _damage(log, "seq not a number")
    verify_run = run_cli("audit", "verify", "--log", str(log))
    assert verify_run.returncode == 1 and "audit.jsonl:2: not an audit entry" in verify_run.stderr
    assert "Traceback" not in verify_run.stderr
    empty = tmp_path / "empty" / "audit.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    verify_empty = run_cli("audit", "verify", "--log", str(empty))
    assert verify_empty.returncode == 1 and "the log is empty" in verify_empty.stderr

    # The last line half-written (a crash mid-append, or an edit): the next command runs with its own exit code
    # and one warning; nothing is chained to the damaged line.
    log.write_text(log.read_text() + '{"seq": 4, "ha')
    before = log.read_text()
    env = {**os.environ, "PIPELINE_AUDIT_LOG": str(log)}
    command = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", "recipes/quickstart.yaml", "--set", "lora.alpah=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert command.returncode == 2 and "Traceback" not in command.stderr
    assert command.stderr.count("warning: this command was not added to the audit log") == 1
    assert "audit.jsonl:5: the last line is not an audit entry" in command.stderr
    assert log.read_text() == before


def test_append_refuses_to_chain_to_a_corrupt_last_line(tmp_path):
    from pipeline.audit import AuditLogCorrupt

    log = make_log(tmp_path, n=2)
    log.write_text(log.read_text() + "garbage\n")
    with pytest.raises(AuditLogCorrupt, match=r"audit.jsonl:3: the last line is not an audit entry"):
        append(log, {"command": "validate"})


def test_a_user_without_a_passwd_entry_is_recorded_by_uid(tmp_path, monkeypatch):
    import getpass

    def no_passwd_entry():
        raise KeyError("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(getpass, "getuser", no_passwd_entry)
    entry = append(tmp_path / "audit.jsonl", {"command": "validate"})
    assert entry["user"] == f"uid:{os.getuid()}"
    assert verify(tmp_path / "audit.jsonl") == []
