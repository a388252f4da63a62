"""Benchmark: pipeline's streaming merge versus peft's ``merge_and_unload`` on a several-shard model (CPU).

A random-weight Llama of ~320M parameters is saved in bf16 in 100 MB shards with a random rank-16 adapter on
every linear layer. Each method runs in its own process, so its peak resident memory is its own: VmHWM from
/proc/self/status (``pipeline.weights.peak_rss_mb``), reset through /proc/self/clear_refs after the imports:

- stream: ``pipeline.export.stream_merge`` (merge_base original), one tensor at a time;
- peft:   load the whole base in bf16, ``PeftModel.from_pretrained``, ``merge_and_unload``, ``save_pretrained``.

Then both outputs are compared tensor by tensor and by the logits of both merged models on the same tokens.

Run as:
    python benchmarks/merge.py                 # ~3 min on 2 CPU cores; writes benchmarks/merge.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {
    "stream": """
from pipeline.export import model_layout, stream_merge
from pipeline.weights import load_adapter
from pipeline.recipe import QuantizationSection
model_layout(base)
reset_peak_rss()
baseline = rss()
start = time.time()
stream_merge(base, load_adapter(adapter), out, "original", QuantizationSection())
""",
    "peft": """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
reset_peak_rss()
baseline = rss()
start = time.time()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="100MB")
""",
}
PRELUDE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch, transformers, peft, safetensors  # imported before the baseline by both methods
from pipeline.weights import peak_rss_mb as rss, reset_peak_rss  # VmHWM, reset after the imports
base, adapter, out = map(Path, sys.argv[1:4])
"""
EPILOGUE = """
print(json.dumps({"seconds": round(time.time() - start, 1), "peak_rss_mb": round(rss(), 1),
                  "baseline_rss_mb": round(baseline, 1)}))
"""


# Measured by hand, not re-run by this script; kept in merge.md when the script rewrites it.
NOTES = """
## Reading shards: safe_open's pread backend

`pipeline.weights.ShardReader` reads through `safetensors.safe_open(path, framework="pt", backend="pread")`.
A 64 MB file of 16 fp32 tensors of 4 MB each, read tensor by tensor, each dropped before the next (safetensors
0.8.0, torch 2.13.0 CPU; VmRSS in MiB):

| backend | before | after reading all 16 | after closing the file |
|---|---|---|---|
| mmap (the default) | 222 | 289 | 289 |
| pread | 221 | 228 | 228 |

With mmap every page read stays resident; with pread only the tensor in hand is, as with plain file I/O into a
fresh buffer.

## Merge bases against the 4-bit reference (tests/test_export.py, the tiny test model)

The adapter never saw the 16-bit weights: an `original` merge's logits drift from base-in-4-bit + adapter by the
NF4 rounding error, max |logit difference| 0.036, against < 1e-4 for the `dequantized` merge; the next tokens
agree in both.
"""


def build(workdir: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> tuple[Path, Path, int]:
    """Random bf16 base in 100 MB shards and a random rank-16 all-linear adapter; returns paths and parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "base", max_shard_size="100MB")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(workdir / "adapter")
    return workdir / "base", workdir / "adapter", params


def run_method(name: str, base: Path, adapter: Path, out: Path) -> dict:
    """One method in a fresh process; its timing and peak RSS."""
    script = PRELUDE.format(root=str(ROOT)) + METHODS[name] + EPILOGUE
    result = subprocess.run(
        [sys.executable, "-c", script, str(base), str(adapter), str(out)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(stream_dir: Path, peft_dir: Path) -> dict:
    """Tensor-by-tensor and logit comparison of the two merged models."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def tensors(directory: Path) -> dict:
        found = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(shard, "pt") as handle:
                found.update({k: shard for k in handle.keys()})
        return found

    ours, theirs = tensors(stream_dir), tensors(peft_dir)
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    max_diff, equal, total = 0.0, 0, 0
    for name in ours:
        with safe_open(ours[name], "pt") as a, safe_open(theirs[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        assert x.dtype == y.dtype == torch.bfloat16, name
        max_diff = max(max_diff, float((x.float() - y.float()).abs().max()))
        equal += int((x == y).sum())
        total += x.numel()
    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = []
    for directory in (stream_dir, peft_dir):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        with torch.inference_mode():
            logits.append(model(input_ids=tokens).logits.float())
        del model
    return {
        "max_abs_weight_diff": max_diff,
        "identical_weight_fraction": equal / total,
        "max_abs_logit_diff": float((logits[0] - logits[1]).abs().max()),
        "next_token_agreement": float((logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean()),
    }


def main() -> None:
    """Build the model, run both methods, compare, and write the Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "merge.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        work = Path(tmp)
        started = time.time()
        base, adapter, params = build(work, args.layers, args.hidden, args.intermediate, args.vocab)
        shards = sorted(base.glob("*.safetensors"))
        size_mb = sum(p.stat().st_size for p in shards) / 2**20
        largest_mb = max(p.stat().st_size for p in shards) / 2**20
        print(
            f"built {params / 1e6:.0f}M params, {len(shards)} shards, {size_mb:.0f} MB in {time.time() - started:.0f}s"
        )
        results = {name: run_method(name, base, adapter, work / name) for name in METHODS}
        for name, r in results.items():
            print(name, r, flush=True)
        shutil.copy(base / "config.json", work / "stream" / "config.json")  # export writes it; stream_merge does not
        same = compare(work / "stream", work / "peft")
        print(same)
    s, p = results["stream"], results["peft"]
    grow = {k: r["peak_rss_mb"] - r["baseline_rss_mb"] for k, r in results.items()}
    lines = [
        "# Streaming merge vs peft merge_and_unload",
        "",
        f"Random-weight Llama, {params / 1e6:.0f}M parameters in bf16: {len(shards)} safetensors shards, "
        f"{size_mb:.0f} MB in all, largest shard {largest_mb:.0f} MB; random rank-16 LoRA on every linear layer. "
        "CPU, each method in its own process. Peak RSS is VmHWM, reset (/proc/self/clear_refs) after importing "
        "torch/transformers/peft, so it is the method's own peak; growth is that peak minus the RSS at the reset.",
        "",
        "| method | wall time (s) | peak RSS (MB) | peak growth over imports (MB) |",
        "|---|---|---|---|",
        f"| pipeline stream_merge | {s['seconds']} | {s['peak_rss_mb']:.0f} | {grow['stream']:.0f} |",
        f"| peft merge_and_unload + save_pretrained | {p['seconds']} | {p['peak_rss_mb']:.0f} | {grow['peft']:.0f} |",
        "",
        f"Peak RSS ratio stream / peft: {s['peak_rss_mb'] / p['peak_rss_mb']:.2f} (growth: "
        f"{grow['stream'] / max(grow['peft'], 1):.2f}); wall time ratio {s['seconds'] / max(p['seconds'], 0.1):.2f}.",
        "",
        "Outputs (stream vs peft):",
        "",
        f"- weights: max |difference| {same['max_abs_weight_diff']:.3g}, "
        f"{same['identical_weight_fraction']:.4%} of elements bit-identical (both add the update in fp32 and round "
        "once to bf16)",
        f"- logits on 2 x 64 random tokens: max |difference| {same['max_abs_logit_diff']:.3g}, "
        f"next-token agreement {same['next_token_agreement']:.2%}",
        "",
        "The stream's extra memory is one tensor at a time plus the adapter (the largest tensor here, the 32,000 x "
        "1,024 embedding, is 63 MB in bf16); peft's is the whole model. The stream is single-threaded file I/O and "
        "was somewhat slower here; timings come from a shared 2-core VM (load average ~10 from other jobs), so "
        "expect +-30% between runs.",
        "",
        "Reproduce: `python benchmarks/merge.py` (defaults: --layers 20 --hidden 1024 --intermediate 2816 "
        "--vocab 32000).",
        "",
    ]
    Path(args.out).write_text("\n".join(lines) + NOTES, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
