"""Benchmark: data-contract throughput and peak memory on synthetic medical-coding rows.

Run as:
    PYTHONPATH=. python benchmarks/contracts.py --rows 1000000          # the recorded run (benchmarks/contracts.md)
    PYTHONPATH=. python benchmarks/contracts.py --rows 100000 --quick   # a few minutes

Each measurement runs in its own process, so peak RSS (``ru_maxrss``) belongs to that measurement alone:

* ``rows``: row-level checks only (types, required, patterns, ICD-10-CM billable codes, lengths);
* ``contract``: the whole shipped contract except the PII scan: row checks, exact duplicates, near-duplicates
  within each split and train -> eval leakage (MinHash/LSH), label coverage and distribution;
* ``contract+tokens``: the same plus token lengths with a small local byte-level BPE tokenizer;
* ``pii``: the Presidio scan alone on a sample (1% of its notes carry planted PHI);
* ``pandera``: the row-level checks written as a pandera ``DataFrameSchema``, on the same rows (pandas holds
  the whole split in memory, so it runs on a sample);
* ``datasketch``: datasketch's ``MinHash`` + ``MinHashLSH`` doing the near-duplicate step, against this
  project's vectorized index on the same sample;
* ``validate`` / ``validate-keep-rows``: what ``python -m pipeline validate`` does (``data.validate_data`` with
  ``keep_rows=False``: the whole shipped contract with the PII scan, all reports and plots written) and the same
  keeping the accepted rows, as ``train`` does. Token checks are left out (they need the base's tokenizer).

Rows are validated streaming (``keep_rows=False``: the benchmark measures the contract, not a list of 1M dicts;
training keeps its accepted rows because TRL builds its dataset from them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHI = [" SSN 536-22-8726.", " Call 617-726-2000.", " MRN: 00412345.", " DOB: 03/14/1962.", " j.doe@example.org"]


def make_data(out: Path, train: int, evaluation: int, seed: int = 0) -> dict[str, Path]:
    """Synthetic notes from the demo generator; 1% of notes carry PHI, 0.5% of eval notes are copied from train."""
    from pipeline import demo, icd10cm

    codes = [c for c in demo.DEMO_CODES if icd10cm.status(c) == "billable"]
    table = {c: demo.phrasings(c) for c in codes}
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    copied: list[str] = []
    for split, count in (("train", train), ("eval", evaluation)):
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for i in range(count):
                row = demo.make_note(rng, codes, table)
                if rng.random() < 0.01:
                    row["note"] += rng.choice(PHI)
                if split == "train" and len(copied) < 1000 and rng.random() < 0.01:
                    copied.append(row["note"])
                if split == "eval" and copied and rng.random() < 0.005:
                    row["note"] = rng.choice(copied)
                handle.write(json.dumps({"id": f"{split}-{i:07d}", **row}) + "\n")
        paths[split] = path
    return paths


def cpu_seconds() -> float:
    """User + system CPU time of this process: throughput per CPU-second does not depend on the machine's load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, train: Path, evaluation: Path, sample: int) -> dict:
    """One measurement, in this process."""
    from pipeline import icd10cm
    from pipeline.contracts import load_contract
    from pipeline.splits import ContractRun

    # One-time cost outside the timing: simple-icd-10-cm parses its table on import (3-12 s here, by load).
    loaded = time.perf_counter()
    icd10cm.status("I10")
    table_seconds = round(time.perf_counter() - loaded, 1)
    contract = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
    no_pii = {name: rule.model_copy(update={"pii": None}) for name, rule in contract.fields.items()}
    base = contract.model_copy(update={"fields": no_pii, "tokens": None})
    started = time.perf_counter()
    if mode in ("rows", "contract", "contract+tokens"):
        if mode == "rows":
            rules = base.dataset.model_copy(update={"text_fields": [], "label_field": None})
            contract = base.model_copy(update={"dataset": rules})
        else:
            contract = base
        counter = None
        if mode == "contract+tokens":
            contract = contract.model_copy(update={"tokens": load_contract_tokens()})
            counter = tiny_token_counter()
        run = ContractRun(contract, measure_tokens=counter, max_length=256, keep_rows=False)
        started, cpu = time.perf_counter(), cpu_seconds()
        splits = [run.split("train", train), run.split("eval", evaluation)]
        dataset = run.finish()
        seconds = time.perf_counter() - started
        rows = sum(s.rows_in for s in splits)
        assert all(s.rows_in == s.rows_accepted + s.rows_quarantined for s in splits)
        found = {s.name: {k: v.count for k, v in s.checks.items()} for s in splits}
        return {
            "mode": mode,
            "icd10cm_table_load_s": table_seconds,
            "rows": rows,
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows / seconds),
            "rows_per_cpu_s": round(rows / (cpu_seconds() - cpu)),
            "peak_rss_mb": round(peak_rss_mb()),
            "found": found,
            "uncovered": dataset.get("label_coverage", {}).get("uncovered_labels"),
        }
    if mode in ("validate", "validate-keep-rows"):
        return validate_measure(mode, train, evaluation, table_seconds)
    lines = read_sample(train, sample)
    if mode == "pii":
        from pipeline.pii import PiiScanner

        scanner = PiiScanner(contract.pii.entities, contract.pii.min_score)
        notes = [json.loads(line)["note"] for line in lines]
        started = time.perf_counter()
        hits = sum(1 for note in notes if scanner.scan(note))
        seconds = time.perf_counter() - started
        return {
            "mode": mode,
            "rows": len(notes),
            "seconds": round(seconds, 2),
            "rows_per_s": round(len(notes) / seconds),
            "rows_with_pii": hits,
            "peak_rss_mb": round(peak_rss_mb()),
        }
    if mode == "pandera":
        return pandera_measure(lines)
    if mode == "ours-sample":
        path = Path(tempfile.mkdtemp()) / "sample.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        rules = base.dataset.model_copy(update={"text_fields": [], "label_field": None})
        run = ContractRun(base.model_copy(update={"dataset": rules}), keep_rows=False)
        started, cpu = time.perf_counter(), cpu_seconds()
        result = run.split("train", path)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        return {
            "mode": mode,
            "rows": result.rows_in,
            "seconds": round(seconds, 2),
            "rows_per_s": round(result.rows_in / seconds),
            "rows_per_cpu_s": round(result.rows_in / cpu),
            "accepted": result.rows_accepted,
            "peak_rss_mb": round(peak_rss_mb()),
        }
    if mode in ("datasketch", "minhash-ours"):
        return near_dup_measure(mode, [json.loads(line)["note"] for line in lines])
    raise ValueError(mode)


def load_contract_tokens():  # noqa: ANN201, D103 - contracts.TokenRules
    from pipeline.contracts import TokenRules

    return TokenRules(min_tokens=8)


def tiny_token_counter():  # noqa: ANN201 - splits.TokenCounter
    """A 1,024-token byte-level BPE trained on demo notes (the quickstart's tokenizer kind), plain prompts."""
    from transformers import PreTrainedTokenizerFast

    from pipeline import demo, icd10cm
    from pipeline.data import token_counter
    from pipeline.tasks import get_task

    codes = [c for c in demo.DEMO_CODES if icd10cm.status(c) == "billable"]
    table = {c: demo.phrasings(c) for c in codes}
    rng = random.Random(1)
    texts = [demo.make_note(rng, codes, table)["note"] for _ in range(2000)]
    tokenizer = demo.train_tokenizer(texts, 1024)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(type(tokenizer))
    return token_counter(tokenizer, get_task("medical_coding"), "plain")


def read_sample(path: Path, n: int) -> list[str]:
    """The first n lines of a split."""
    out = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            out.append(line)
            if len(out) >= n:
                break
    return out


def pandera_measure(lines: list[str]) -> dict:
    """The same row-level rules as a pandera schema (what a user of that library would write)."""
    import pandas as pd
    import pandera.pandas as pa

    from pipeline import icd10cm

    started, cpu = time.perf_counter(), cpu_seconds()
    frame = pd.DataFrame([json.loads(line) for line in lines])
    code = r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$"
    import re

    pattern = re.compile(code)
    schema = pa.DataFrameSchema(
        {
            "id": pa.Column(str, pa.Check.str_matches(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"), nullable=True),
            "note": pa.Column(str, [pa.Check.str_length(20, 20000)]),
            "codes": pa.Column(
                object,
                [
                    pa.Check(lambda s: s.map(lambda v: isinstance(v, list) and 1 <= len(v) <= 25), name="items"),
                    pa.Check(lambda s: s.map(lambda v: len(set(v)) == len(v)), name="unique_items"),
                    pa.Check(lambda s: s.map(lambda v: all(pattern.match(c) for c in v)), name="pattern"),
                    pa.Check(
                        lambda s: s.map(lambda v: all(icd10cm.status(c) == "billable" for c in v)), name="billable"
                    ),
                ],
            ),
        }
    )
    try:
        schema.validate(frame, lazy=True)
        failures = 0
    except pa.errors.SchemaErrors as exc:
        failures = len(exc.failure_cases)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {
        "mode": "pandera",
        "rows": len(frame),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(frame) / seconds),
        "rows_per_cpu_s": round(len(frame) / cpu),
        "failure_cases": failures,
        "peak_rss_mb": round(peak_rss_mb()),
    }


def near_dup_measure(mode: str, notes: list[str]) -> dict:
    """Index a sample and find its near-duplicate pairs: datasketch vs pipeline.dedup (64 permutations each)."""
    from pipeline.dedup import MinHasher, normalize, pairs_within

    hasher = MinHasher()
    texts = [normalize(n) for n in notes]
    before = peak_rss_mb()
    started = time.perf_counter()
    if mode == "datasketch":
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=0.8, num_perm=64)
        pairs = 0
        for i, text in enumerate(texts):
            words = text.split()
            shingles = {" ".join(words[j : j + 3]).encode() for j in range(max(1, len(words) - 2))}
            m = MinHash(num_perm=64)
            m.update_batch(list(shingles))
            pairs += bool(lsh.query(m))
            lsh.insert(i, m)
    else:
        pairs = 0
        signatures = []
        for start in range(0, len(texts), 2048):
            signatures.append(hasher.signatures(texts[start : start + 2048]))
        import numpy as np

        sig = np.concatenate(signatures)
        pairs = len(pairs_within(hasher.band_keys(sig), sig, 0.8))
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "rows": len(texts),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(texts) / seconds),
        "rows_with_near_dup": pairs,
        "rss_growth_mb": round(peak_rss_mb() - before),
    }


def child(mode: str, paths: dict[str, Path], sample: int) -> dict:
    """Run one measurement in a fresh process (its own peak RSS) and return its JSON line."""
    command = [
        sys.executable,
        __file__,
        "--measure",
        mode,
        "--train",
        str(paths["train"]),
        "--eval",
        str(paths["eval"]),
        "--sample",
        str(sample),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        return {"mode": mode, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def validate_measure(mode: str, train: Path, evaluation: Path, table_seconds: float) -> dict:
    """``validate``'s own code path on the files, with the shipped contract less its token checks."""
    import yaml

    from pipeline.data import validate_data
    from pipeline.recipe import load_recipe

    work = Path(tempfile.mkdtemp(prefix="contracts-validate-"))
    raw = yaml.safe_load((ROOT / "data_contracts" / "medical_coding.yaml").read_text())
    raw.pop("tokens", None)
    (work / "contract.yaml").write_text(yaml.safe_dump(raw))
    overrides = [f"data.train={train}", f"data.eval={evaluation}", f"data.contract={work / 'contract.yaml'}"]
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    started, cpu = time.perf_counter(), cpu_seconds()
    data = validate_data(recipe, work / "run", keep_rows=mode == "validate-keep-rows")
    seconds = time.perf_counter() - started
    rows = data.train.rows_in + data.eval.rows_in
    return {
        "mode": mode,
        "icd10cm_table_load_s": table_seconds,
        "rows": rows,
        "rows_kept": len(data.train.rows) + len(data.eval.rows),
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "rows_per_cpu_s": round(rows / (cpu_seconds() - cpu)),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    """Generate the data, then run each measurement in its own process and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in total (90%% train, 10%% eval)")
    parser.add_argument("--sample", type=int, default=100_000, help="rows for pandera / datasketch / PII")
    parser.add_argument(
        "--modes", default="rows,contract,contract+tokens,pii,ours-sample,pandera,minhash-ours,datasketch"
    )
    parser.add_argument("--data", help="directory for the generated files (default: a temporary one)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller samples")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.train), Path(args.eval), args.sample)))
        return
    data = Path(args.data or tempfile.mkdtemp(prefix="contracts-bench-"))
    started = time.perf_counter()
    train = args.rows * 9 // 10
    paths = make_data(data, train, args.rows - train)
    size = sum(p.stat().st_size for p in paths.values()) / 1e6
    print(f"generated {args.rows:,} rows ({size:.0f} MB) in {time.perf_counter() - started:.0f}s: {data}", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    sample = min(args.sample, train) if not args.quick else min(20_000, train)
    for mode in args.modes.split(","):
        result = child(mode, paths, sample)
        print(json.dumps(result), flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
