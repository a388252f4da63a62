"""Redacted PHI never reaches any output: run directory files, the MLflow database or its artifacts.

One short real training run (2 optimizer steps of the tiny 4-bit model) on splits with planted PHI, then a
byte scan of everything the run wrote.
"""

import json

PLANTED = {"ssn": "536-22-8726", "phone": "617-726-2000", "mrn": "00412345", "email": "jane.doe@mgh.harvard.edu"}


def test_redacted_phi_never_appears_in_run_outputs_or_mlflow(tmp_path, tiny_assets, recipe_with):
    from pipeline.recipe import load_recipe
    from pipeline.train import train

    phi = f" SSN {PLANTED['ssn']}, call {PLANTED['phone']}, MRN: {PLANTED['mrn']}, mail {PLANTED['email']}."
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (tiny_assets["data"] / f"{split}.jsonl").read_text().splitlines()]
        rows = rows[:48] if split == "train" else rows[:12]  # the contract wants at least 10 eval rows
        rows[1]["note"] += phi
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_path = recipe_with(
        "phi.yaml",
        data={"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        training={"max_steps": 2, "logging_steps": 1},
        eval={"batch_size": 12, "max_new_tokens": 4},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "experiment": "phi"},
    )
    result = train(load_recipe(recipe_path), recipe_source=recipe_path, run_dir=tmp_path / "run")

    report = json.loads((result.run_dir / "validation" / "report.json").read_text())
    assert report["splits"]["train"]["checks"]["pii_redact"]["examples"] == [2]
    assert report["splits"]["eval"]["checks"]["pii_redact"]["examples"] == [2]
    assert (tmp_path / "mlartifacts").is_dir()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("train.jsonl", "eval.jsonl")]
    assert any(p.name == "predictions.jsonl" for p in written) and any(p.suffix == ".db" for p in written)
    logged = {
        p.relative_to(tmp_path).as_posix().split("/artifacts/", 1)[-1] for p in written if "mlartifacts" in p.parts
    }
    for name in ("report.json", "quarantine.jsonl", "report.md", "token_lengths.png", "label_frequency.png"):
        assert f"validation/{name}" in logged, name
    for path in written:
        data = path.read_bytes()
        for name, value in PLANTED.items():
            assert value.encode() not in data, f"{name} found in {path}"
