import json
import os

import pytest
from test_recipe import run_cli

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
    os.environ["PIPELINE_AUDIT_LOG"] = str(env_log)  # inherited by the subprocesses below
    try:
        data = tiny_assets["data"]
        assert (
            run_cli(
                "validate",
                "recipes/quickstart.yaml",
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
        from pipeline.audit import sha256_file

        assert first["outputs"]["validation/report.json"] == sha256_file(report)
        assert first["inputs"][f"data.train:{data / 'train.jsonl'}"] == sha256_file(data / "train.jsonl")
        ok = run_cli("audit", "verify")
        assert ok.returncode == 0 and "chain intact" in ok.stdout
        lines = lines_of(env_log)
        env_log.write_text("\n".join(lines[1:]) + "\n")  # drop the first entry
        bad = run_cli("audit", "verify")
        assert bad.returncode == 1 and "does not follow the previous entry" in bad.stderr
    finally:
        os.environ["PIPELINE_AUDIT_LOG"] = str(tmp_path / "elsewhere.jsonl")
