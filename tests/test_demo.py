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
