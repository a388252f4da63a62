"""scripts/gpu_probe.py on a CPU with a tiny shape: random 4-bit weights, real QLoRA steps, the JSON it writes."""

import json
import math

import pytest
from conftest import ROOT
from helpers import load_probe


def test_probe_runs_real_4bit_steps_on_cpu_and_reports_against_the_planner(tiny_assets, tmp_path):
    probe = load_probe()
    out = tmp_path / "probe.json"
    code = probe.main(
        [
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--config",
            str(tiny_assets["model"] / "config.json"),  # hidden 64, MLP 128: multiples of 64 for 4-bit on CPU
            "--set",
            "training.max_length=64",
            "--set",
            "training.micro_batch_size=2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["model_init"] == "random" and result["device"] == "cpu"
    config = json.loads((tiny_assets["model"] / "config.json").read_text())
    # Every decoder linear was a bitsandbytes 4-bit layer: 7 per layer.
    assert result["linear4bit_layers"] == 7 * config["num_hidden_layers"]
    # The model that trained has exactly the planner's trainable count (LoRA + trained embeddings copy).
    assert result["trainable_parameters"] == result["parameters"]["trainable"] > 0
    assert result["shape"]["tokens_per_step"] == 2 * 64 and result["loss"] == "fused"
    # The planner's static terms equal the bytes the real tensors occupy (fp32 compute on a CPU: 4-byte rest and
    # adapter); the constants differ only by the NF4 (16) and 8-bit (256) fp32 code tables and the offset.
    static = result["static_bytes"]
    for name in ("4-bit codes", "frozen 16-bit/fp32 weights", "trainable weights"):
        assert static[name]["measured"] == static[name]["planned"] > 0, name
    slack = static["quantization constants"]["measured"] - static["quantization constants"]["planned"]
    assert 0 <= slack <= result["linear4bit_layers"] * ((16 + 256) * 4 + 4 + 8)
    assert len(result["step_times_s"]) == 2 and result["step_time_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(128 / result["step_time_s"], rel=1e-3)
    # Random weights of std 0.02 give a near-uniform next-token distribution: loss ~ ln(vocab).
    assert all(math.isfinite(x) for x in result["losses"])
    assert abs(result["losses"][0] - math.log(config["vocab_size"])) < 0.5
    for key in ("allocated_gib", "reserved_gib", "needed_gib", "components_gib"):
        assert key in result["planner"]
    assert "measured" not in result and "planner_error" not in result  # no CUDA: no device memory figures
    assert result["mfu"] is None and result["model_flops_per_token"] > 0 and result["host_peak_rss_gib"] > 0


def test_probe_helpers():
    probe = load_probe()
    assert probe.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert probe.peak_flops("NVIDIA H200", None) == 989e12 and probe.peak_flops("Tesla T4", None) is None
    assert probe.peak_flops("Tesla T4", 65.0) == 65e12
    assert probe.relative_error(55.0, 50.0) == 0.1 and probe.relative_error(1.0, None) is None
    config = {"vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 2}
    # 6 x (total - embeddings) + 12 x layers x hidden x seq
    assert probe.model_flops_per_token(config, {"total": 140}, 8) == 6 * (140 - 40) + 12 * 2 * 4 * 8
