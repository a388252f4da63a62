import json

import pytest
from conftest import ROOT

from pipeline.contracts import load_contract
from pipeline.demo import build_demo_dataset, phrasings
from pipeline.splits import validate_split


def test_demo_data_is_deterministic_valid_and_leak_free(tmp_path):
    a = build_demo_dataset(tmp_path / "a", num_train=300, num_eval=40, seed=3)
    b = build_demo_dataset(tmp_path / "b", num_train=300, num_eval=40, seed=3)
    for split in ("train", "eval"):
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    contract = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
    for split, n in (("train", 300), ("eval", 40)):
        result = validate_split(split, a / f"{split}.jsonl", contract)
        assert result.rows_accepted == n and result.rows_quarantined == 0
    notes = {
        split: {json.loads(line)["note"] for line in (a / f"{split}.jsonl").read_text().splitlines()}
        for split in ("train", "eval")
    }
    assert not notes["train"] & notes["eval"]
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert {len(r["codes"]) for r in rows} == {1, 2, 3}


def test_phrasings_come_from_the_official_description():
    assert phrasings("I10") == ["essential hypertension", "HTN"]
    assert "COPD" in phrasings("J44.9")


@pytest.mark.slow
def test_quickstart_meets_the_acceptance_bar(tmp_path):
    """The README's first command, end to end, on freshly built demo assets (minutes; `make test-all`)."""
    import subprocess
    import sys

    from helpers import run_cli

    subprocess.run(
        [sys.executable, "scripts/make_demo_assets.py", "--root", str(tmp_path / "demo")],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    demo = tmp_path / "demo"
    result = run_cli(
        "train",
        "recipes/quickstart.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"model.path={demo / 'tiny-llama-icd10'}",
        "--set",
        f"data.train={demo / 'medical_coding' / 'train.jsonl'}",
        "--set",
        f"data.eval={demo / 'medical_coding' / 'eval.jsonl'}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["systems"]
    assert metrics["finetuned"]["micro_f1"] >= 0.7
    assert metrics["finetuned"]["micro_f1"] - metrics["base"]["micro_f1"] >= 0.4


@pytest.mark.slow
def test_openai_migration_quickstart_meets_the_acceptance_bar(tmp_path):
    """The chat demo end to end: the fine-tune clearly beats the base on exact match (minutes; `make test-all`)."""
    import subprocess
    import sys

    from helpers import run_cli

    subprocess.run(
        [sys.executable, "scripts/make_demo_assets.py", "--chat", "--root", str(tmp_path / "demo")],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    demo = tmp_path / "demo"
    result = run_cli(
        "train",
        "recipes/openai_migration_quickstart.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"model.path={demo / 'tiny-llama-chat'}",
        "--set",
        f"data.train={demo / 'support_desk' / 'train.jsonl'}",
        "--set",
        f"data.eval={demo / 'support_desk' / 'eval.jsonl'}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["systems"]
    assert metrics["finetuned"]["exact_match"] - metrics["base"]["exact_match"] >= 0.5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["turns_cut_by_max_length"] == 0

    # Any well-formed OpenAI file, not only the demo's: one file of other conversations, split, then validated.
    import random

    rng = random.Random(11)
    words = "refund invoice parcel login password courier charge warranty screen battery delayed".split()
    lines = []
    for i in range(300):
        ask = " ".join(rng.choice(words) for _ in range(12))
        messages = [{"role": "user", "content": f"case {i}: {ask}"}]
        messages += [{"role": "assistant", "content": "ok", "weight": 0}]
        messages += [{"role": "user", "content": [{"type": "text", "text": "and now?"}]}]
        messages += [{"role": "assistant", "content": json.dumps({"queue": rng.choice(words), "priority": "low"})}]
        lines.append(json.dumps({"messages": messages}))
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    split = run_cli("split", str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "mine"))
    assert split.returncode == 0, split.stderr[-2000:]
    checked = run_cli(
        "validate",
        "recipes/openai_migration_quickstart.yaml",
        "--run-dir",
        str(tmp_path / "validate"),
        "--set",
        f"model.path={demo / 'tiny-llama-chat'}",
        "--set",
        f"data.train={tmp_path / 'mine' / 'train.jsonl'}",
        "--set",
        f"data.eval={tmp_path / 'mine' / 'eval.jsonl'}",
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    report = json.loads((tmp_path / "validate" / "validation" / "report.json").read_text())
    assert report["splits"]["train"]["rows_accepted"] + report["splits"]["eval"]["rows_accepted"] == 300
    assert report["splits"]["eval"]["checks"]["leakage"]["count"] == 0


def test_chat_demo_data_is_deterministic_and_has_every_kind(tmp_path):
    from pipeline.chat import check
    from pipeline.demo import build_chat_demo_dataset

    first = build_chat_demo_dataset(tmp_path / "a", num_train=120, num_eval=20, seed=3)
    second = build_chat_demo_dataset(tmp_path / "b", num_train=120, num_eval=20, seed=3)
    assert (first / "train.jsonl").read_bytes() == (second / "train.jsonl").read_bytes()
    rows = [json.loads(line) for line in (first / "train.jsonl").read_text().splitlines()]
    assert all(not check(row) for row in rows)  # every row passes OpenAI's file checks
    assert any(m.get("weight") == 0 for row in rows for m in row["messages"])  # weight-0 turns
    assert any(row["messages"][-1].get("tool_calls") for row in rows)  # rows ending at a tool call
    assert any(m["role"] == "tool" for row in rows for m in row["messages"])  # tool results
    assert any(len(row["messages"]) == 3 and "tools" not in row for row in rows)  # single-turn


def test_chat_base_tokenizer_renders_tools_and_closes_turns():
    from pipeline.demo import train_tokenizer

    tok = train_tokenizer(["where is my order"] * 10, 300, chat=True)
    assert tok.eos_token == "<|im_end|>"
    messages = [
        {"role": "user", "content": "where is my order 12?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": 12}'}}]},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {}}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '<tool_call>{"name": "lookup_order", "arguments": {"order_id": 12}}</tool_call><|im_end|>' in text
    assert text.count("lookup_order") == 2  # the definition and the call
    prompt = tok.apply_chat_template(messages[:1], tools=tools, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
