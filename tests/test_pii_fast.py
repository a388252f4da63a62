"""The PII scan's fast path (recognizers skipped where they provably cannot match) finds exactly what the
reference path (every recognizer on every text) finds, on generated notes with planted PII and near misses."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("presidio_analyzer")

from pipeline.pii import PII_ENTITIES, PiiScanner, redact  # noqa: E402

PLANTED = [
    "SSN 536-22-8726", "ssn 536 22 8726", "536228726", "53622-8726", "536-228726", "536.22.8726", "536-22.8726",
    "Call 617-726-2000", "(617) 726-2000", "617.726.2000", "+1 617 726 2000", "+44 20 7946 0958", "+49 30 901820",
    "011 44 20 7946 0958", "310-1234", "6177262000", "1-800-555-0199 ext. 12", "617-726-2000 x12", "+43 1 5880",
    "j.doe@example.org", "a@b.co", "x@localhost", "card 4111 1111 1111 1111", "4111-1111-1111-1111", "5500000000000004",
    "DOB: 03/14/1962", "dob 3-14-62", "born on March 14, 1962", "Date of birth 1962-03-14", "birthdate 14 Mar 1962",
    "MRN: 00412345", "MR# AB-1234567", "medical record number 12345678", "chart no. 99887766", "mrn 123",
    "BP 132/84, HR 76, RR 16, T 98.6, SpO2 97%", "Seen 03/14/2024 at 10:30", "A1c 7.2 on 2024-01-05",
    "＋４４ ２０ ７９４６ ０９５８", "٦١٧-٧٢٦-٢٠٠٠", "phone: 617 726 2000", "tel 617-726-2OOO", "1-800-FLOWERS",
]  # fmt: skip
FILLER = ["Pt seen.", "HTN stable.", "Denies chest pain.", "Follow up in 3 months.", "Alert and oriented x3.",
          "Labs: Na 139, K 4.1, Cr 0.9.", "Weight 82 kg.", "Plan: recheck.",
          "extension of symptoms noted."]  # fmt: skip


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = rng.sample(FILLER, rng.randint(1, 4))
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            planted = rng.choice(PLANTED)
            if rng.random() < 0.3:  # near misses: a digit dropped, a separator changed, case changed
                i = rng.randrange(len(planted))
                planted = rng.choice([planted[:i] + planted[i + 1 :], planted.replace("-", rng.choice(" ./x")),
                                      planted.upper(), planted.lower()])  # fmt: skip
            parts.insert(rng.randint(0, len(parts)), planted + rng.choice([".", ",", "", ";"]))
        out.append(" ".join(parts))
    return out


@pytest.fixture(scope="module")
def scanner() -> PiiScanner:
    return PiiScanner(PII_ENTITIES, 0.4)


def test_fast_scan_equals_reference_on_planted_pii(scanner):
    texts = [*PLANTED, *_texts(0, 1500)]
    assert scanner._gates, "no gate is active: the test would compare the reference with itself"
    found = 0
    for text in texts:
        fast, reference = scanner.scan(text), scanner.scan(text, reference=True)
        assert fast == reference, text
        assert redact(text, fast) == redact(text, reference)
        found += bool(reference)
    assert found > 300  # the planted PII is found (by both), so equality is not vacuous


def test_gates_skip_clean_notes(scanner):
    # Vitals and dates hold digits but no PII: every recognizer is skipped, no Presidio call.
    text = "89 y/o female. BP 150/75, HR 76, RR 20, T 98.9, SpO2 96%. Alert and oriented x3."
    assert not any(gate(text) for gate in scanner._gates.values())
    assert scanner._gates["PHONE_NUMBER"]("Call 617-726-2000.")
    assert scanner._gates["US_SSN"]("SSN 536-22-8726")


def test_token_counter_direct_encoder_equals_call(tiny_assets):
    # data.token_counter reads lengths from the Rust encoder directly; they must equal what __call__ gives.
    from transformers import AutoTokenizer

    from pipeline.data import token_counter
    from pipeline.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    task = get_task("medical_coding")
    rows = [{"note": t, "codes": ["E11.9", "I10"]} for t in _texts(1, 200)]
    counted = token_counter(tokenizer, task, "plain")(rows)
    prompts = [task.plain_prompt(r) for r in rows]
    fulls = [p + " " + task.target(r) for p, r in zip(prompts, rows, strict=True)]
    expected = [
        (len(p), len(f) + 1)
        for p, f in zip(tokenizer(prompts)["input_ids"], tokenizer(fulls)["input_ids"], strict=True)
    ]
    assert counted == expected
    backend = tokenizer._tokenizer  # the direct path is the one compared
    assert hasattr(backend, "encode_batch_fast") and backend.truncation is None and backend.padding is None
