"""Benchmark: the PII scan's fast path vs its reference path on notes with vitals, dates and planted PHI.

Run as:
    PYTHONPATH=. python benchmarks/pii_scan.py --notes 5000

Notes come from the demo generator; 70% get a vitals line (BP, HR, RR, T, SpO2), 50% a visit date, 2% one planted
PHI string. Both paths scan the same notes; the script asserts identical findings and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHI = [" SSN 536-22-8726.", " Call 617-726-2000.", " MRN: 00412345.", " DOB: 03/14/1962.", " j.doe@example.org",
       " Card 4111 1111 1111 1111."]  # fmt: skip


def notes(n: int, seed: int = 0) -> list[str]:
    """Demo notes with vitals and visit dates (digits everywhere, as in real notes) and 2% planted PHI."""
    from pipeline import demo, icd10cm

    codes = [c for c in demo.DEMO_CODES if icd10cm.status(c) == "billable"]
    table = {c: demo.phrasings(c) for c in codes}
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        note = demo.make_note(rng, codes, table)["note"]
        if rng.random() < 0.7:
            note += (
                f" BP {rng.randint(95, 175)}/{rng.randint(55, 105)}, HR {rng.randint(50, 120)}, "
                f"RR {rng.randint(12, 24)}, T {rng.uniform(96.5, 101.5):.1f}, SpO2 {rng.randint(88, 100)}%."
            )
        if rng.random() < 0.5:
            note = f"Seen {rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/20{rng.randint(18, 26)}. " + note
        if rng.random() < 0.02:
            note += rng.choice(PHI)
        out.append(note)
    return out


def main() -> None:
    """Scan the same notes with both paths, assert identical findings, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notes", type=int, default=5000)
    args = parser.parse_args()
    from pipeline.contracts import load_contract
    from pipeline.pii import PiiScanner

    contract = load_contract(Path(__file__).resolve().parents[1] / "data_contracts" / "medical_coding.yaml")
    scanner = PiiScanner(contract.pii.entities, contract.pii.min_score)
    texts = notes(args.notes)
    result = {"notes": len(texts), "load_average_before": os.getloadavg()[0]}
    found = {}
    for name, reference in (("fast", False), ("reference", True)):
        started, cpu = time.perf_counter(), time.process_time()
        found[name] = [scanner.scan(t, reference=reference) for t in texts]
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        result[name] = {"seconds": round(seconds, 2), "notes_per_s": round(len(texts) / seconds),
                        "notes_per_cpu_s": round(len(texts) / cpu)}  # fmt: skip
    assert found["fast"] == found["reference"], "fast path differs from the reference"
    result["notes_with_findings"] = sum(map(bool, found["fast"]))
    result["identical"] = True
    print(json.dumps(result))


if __name__ == "__main__":
    main()
