"""The review notebook runs headless against a run made by the test suite."""

import ast
import json

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "review_runs.ipynb"


def test_notebook_imports_only_pipeline_mlflow_and_plotting():
    import nbformat

    allowed = {"os", "pathlib", "matplotlib", "pandas", "mlflow", "pipeline"}
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {n.split(".")[0] for n in names} <= allowed, names


def test_notebook_executes_against_the_suites_run(trained_run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PIPELINE_TRACKING_URI", trained_run.summary["tracking_uri"])
    monkeypatch.setenv("PIPELINE_RUN_ID", trained_run.mlflow_run_id)
    monkeypatch.setenv("PIPELINE_REVIEW_DIR", str(tmp_path / "review"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    assert f"Reviewing run {trained_run.mlflow_run_id}" in text
    assert "train:train.jsonl" in text and "No baseline comparison in this run." in text
    assert (tmp_path / "review" / "systems_metrics.png").stat().st_size > 1000
    assert (tmp_path / "review" / "per_label_f1.png").is_file()
