"""Serving an export: vLLM's LoRA loader rules (checked without vLLM), the serving commands, and what the card says."""

import json
import shutil

import pytest

from pipeline.serving import VLLM_MAX_LORA_RANKS, serving_report, vllm_check, vllm_max_lora_rank

LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "modules_to_save": None, "use_dora": False, "rank_pattern": {}}


def test_a_plain_lora_adapter_loads_with_the_default_max_lora_rank():
    check = vllm_check(LORA)
    assert check["loads"] and check["verdict"] == "loads in vLLM as a LoRA adapter"
    assert check["reasons"] == [] and check["max_lora_rank"] == 16 and check["instead"] is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modules_to_save": ["embed_tokens"]}, "modules_to_save is embed_tokens: vLLM only loads adapters whose"),
        ({"use_dora": True}, "use_dora is true: vLLM does not load DoRA adapters"),
        ({"r": 640}, "LoRA rank 640 is above 512"),
        ({"rank_pattern": {"q_proj": 1024}}, "LoRA rank 1024 is above 512"),
    ],
)
def test_vllm_refuses_modules_to_save_dora_and_ranks_above_512(change, reason):
    check = vllm_check({**LORA, **change})
    assert not check["loads"] and any(reason in r for r in check["reasons"]), check["reasons"]
    assert check["verdict"].startswith("does not load in vLLM as a LoRA adapter: ")
    assert "serve the merged export" in check["instead"]


def test_max_lora_rank_is_the_smallest_allowed_value_that_holds_the_rank():
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    expected = {1: 1, 2: 8, 8: 8, 9: 16, 16: 16, 17: 32, 64: 64, 200: 256, 300: 320, 321: 512, 512: 512, 513: None}
    assert {rank: vllm_max_lora_rank(rank) for rank in expected} == expected
    check = vllm_check({**LORA, "r": 24})
    assert check["loads"] and check["max_lora_rank"] == 32 and "--max-lora-rank 32" in check["verdict"]
    # A per-module rank above r decides the flag: vLLM would refuse that module under a smaller one.
    assert vllm_check({**LORA, "r": 8, "rank_pattern": {"down_proj": 64}})["max_lora_rank"] == 64


def test_the_serving_commands_are_exact_and_adapter_commands_only_for_an_adapter_vllm_loads():
    where = dict(base="meta-llama/Llama-3.3-70B-Instruct", name="coder", adapter_dir="/x/export/adapter")
    serving = serving_report({**LORA, "r": 24}, **where, merged_dir="/x/export/merged")
    assert serving["commands"] == {
        "vllm_adapter": "vllm serve meta-llama/Llama-3.3-70B-Instruct --enable-lora --lora-modules "
        "coder=/x/export/adapter --max-lora-rank 32",
        "tgi_adapter": "text-generation-launcher --model-id meta-llama/Llama-3.3-70B-Instruct --lora-adapters "
        "coder=/x/export/adapter",
        "vllm_merged": "vllm serve /x/export/merged --served-model-name coder",
        "tgi_merged": "text-generation-launcher --model-id /x/export/merged",
    }
    refused = serving_report({**LORA, "modules_to_save": ["embed_tokens"]}, **where, merged_dir="/x/export/merged")
    assert set(refused["commands"]) == {"vllm_merged", "tgi_merged"}
    spaced = serving_report(LORA, **{**where, "adapter_dir": "/my runs/adapter"}, merged_dir="/my runs/merged")
    assert "--lora-modules 'coder=/my runs/adapter'" in spaced["commands"]["vllm_adapter"]  # shell-quoted


def _card(trained_run, tmp_path, metrics=None, serving=None, summary=None):
    """The model card of the session's run, with its eval metrics (or ``metrics``) and summary (or ``summary``)."""
    from pipeline import licenses
    from pipeline.card import model_card
    from pipeline.recipe import load_recipe

    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "validation", run / "validation")
    (run / "eval").mkdir()
    metrics = metrics or json.loads((trained_run.run_dir / "eval" / "metrics.json").read_text())
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (run / "summary.json").write_text(json.dumps(summary or trained_run.summary))
    recipe = load_recipe(trained_run.run_dir / "recipe.resolved.yaml")
    lic = licenses.lookup("apache-2.0")
    ack = licenses.acknowledgment(lic, "apache-2.0", "model.license", "tiny")
    return model_card(
        recipe, run, model_name="tiny", kind="adapter", ack=ack, lic=lic, mlflow_run_id="abc", serving=serving
    )


def _per_label_metrics(f1s: dict[str, float], micro: float) -> dict:
    per_label = {k: {"precision": v, "recall": v, "f1": v, "support": 3.0} for k, v in f1s.items()}
    per_label["Z99.9"] = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0.0}  # not in the eval split
    return {
        "main_metric": "micro_f1",
        "systems": {"finetuned": {"micro_f1": micro}},
        "per_label": {"finetuned": per_label},
    }


def test_weakest_labels_lists_only_labels_below_the_model_and_says_when_there_are_none(trained_run, tmp_path):
    perfect = _card(trained_run, tmp_path / "a", _per_label_metrics({"E11.9": 1.0, "I10": 1.0}, 1.0))
    assert "Weakest labels" not in perfect and "E11.9" not in perfect
    assert "- No weak label on the eval split: every label scores an F1 at or above the fine-tune's micro_f1" in perfect

    mixed = _card(trained_run, tmp_path / "b", _per_label_metrics({"E11.9": 1.0, "I10": 0.4, "J45.909": 0.75}, 0.8))
    line = next(x for x in mixed.splitlines() if "Weakest labels" in x)
    assert line == (
        "- Weakest labels on the eval split (F1 below the fine-tune's micro_f1 (0.80)): I10 (F1 0.40, 3 in eval), "
        "J45.909 (F1 0.75, 3 in eval)."
    )


def test_the_card_names_the_loss_for_what_it_is(trained_run, tmp_path):
    card = _card(trained_run, tmp_path)
    steps, loss = trained_run.summary["optimizer_steps"], trained_run.summary["train_loss_mean"]
    assert f"({steps} optimizer steps, mean training loss {loss:.4f})" in card
    assert "final loss" not in card


def test_the_card_says_whether_vllm_loads_the_adapter_and_how_to_serve_it(trained_run, tmp_path):
    where = dict(base="base-id", name="tiny", adapter_dir="/o/adapter", merged_dir="/o/merged")
    loads = _card(trained_run, tmp_path / "a", serving={**serving_report(LORA, **where), "merged": "verified"})
    section = loads.split("## Serving")[1].split("## Intended use")[0]
    assert "vLLM: the adapter **loads in vLLM as a LoRA adapter**." in section
    assert "vllm serve base-id --enable-lora --lora-modules tiny=/o/adapter --max-lora-rank 16" in section
    assert "text-generation-launcher --model-id base-id --lora-adapters tiny=/o/adapter" in section
    assert "vllm serve /o/merged --served-model-name tiny" in section and "4-bit NF4" in section

    saved = {**LORA, "modules_to_save": ["embed_tokens"]}
    failed = _card(
        trained_run, tmp_path / "b", serving={**serving_report(saved, **where), "merged": "failed verification"}
    )
    section = failed.split("## Serving")[1].split("## Intended use")[0]
    assert "**does not load in vLLM as a LoRA adapter: modules_to_save is embed_tokens" in section
    assert "Instead: serve the merged export" in section and "--enable-lora" not in section
    assert "The merged model failed verification: do not serve it" in section and "vllm serve" not in section
