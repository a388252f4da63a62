"""Splits through a contract: every record of a split file accepted or quarantined, and the dataset checks.

``ContractRun`` streams the train split, then the eval split (checked against train): the readers in ``records``,
the row checks in ``contracts``, then the PII policy, token lengths, duplicates, leakage and label coverage. Every
record ends either accepted or in quarantine with its row number and reasons, never dropped, so
``rows_in == rows_accepted + rows_quarantined``. ``build_report`` and ``over_threshold`` turn the results into
report.json and the reasons to stop.

This module imports no torch, transformers or mlflow; presidio only when a field has a PII policy (``pii``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import chat
from pipeline.contracts import DataContract, check_row, conversation_row, row_passes
from pipeline.dedup import LshIndex, MinHasher, normalize, pairs_within, text_hash
from pipeline.errors import UsageError
from pipeline.pii import pii_scanner, redact
from pipeline.records import READ_CHECKS, Reason, Record, file_format, iter_records, utf8_ok
from pipeline.rundir import sha256_file

# Dataset checks that note the rows they find themselves (with a pair or a breakdown) before quarantining them.
_NOTED_BY_CHECK = frozenset({"leakage", "exact_duplicate", "near_duplicate", "label_coverage"})
EXAMPLES = 10  # row numbers kept per check as examples in report.json
PAIRS = 100  # duplicate/leakage pairs kept per check in report.json
BATCH = 2048  # rows per batch for the PII scan, token counts and MinHash signatures


@dataclass
class CheckStat:
    """What one check found in a split: the action it took, how many rows, example rows and pairs."""

    action: str
    count: int = 0
    examples: list[int] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    by: Counter = field(default_factory=Counter)
    # Every pair, not only the first PAIRS, for validation/pairs.jsonl: two row numbers and a similarity per pair
    # in flat arrays (24 bytes a pair; a dict a pair would be ~20x that for 100,000s of templated near-duplicates).
    pair_keys: tuple[str, ...] = ()
    _firsts: array = field(default_factory=lambda: array("q"))
    _seconds: array = field(default_factory=lambda: array("q"))
    _similarities: array = field(default_factory=lambda: array("d"))

    def add_pair(self, pair: dict[str, Any]) -> None:
        """Keep one pair ``{row, <other row>[, similarity]}``: in full, and in ``pairs`` while under PAIRS."""
        if len(self.pairs) < PAIRS:
            self.pairs.append(pair)
        if not self.pair_keys:
            self.pair_keys = tuple(pair)
        values = list(pair.values())
        self._firsts.append(values[0])
        self._seconds.append(values[1])
        self._similarities.append(values[2] if len(values) > 2 else math.nan)

    def all_pairs(self) -> Iterator[dict[str, Any]]:
        """Every pair this check found, in the order found, with the keys of the report's pairs."""
        keys = self.pair_keys
        for first, second, similarity in zip(self._firsts, self._seconds, self._similarities, strict=True):
            values = (first, second, similarity) if len(keys) > 2 else (first, second)
            yield dict(zip(keys, values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """JSON form for report.json (row numbers only, never row content)."""
        out: dict[str, Any] = {"action": self.action, "count": self.count, "examples": self.examples}
        if self.pair_keys:
            out["pairs"] = self.pairs
            out["pairs_total"] = len(self._firsts)
            out["pairs_file"] = "pairs.jsonl"  # every pair, when more than the PAIRS kept here
        if self.by:
            out["by"] = dict(self.by.most_common())
        return out


@dataclass
class SplitResult:
    """What one split turned into: accepted rows, quarantined rows, and counts that reconcile.

    Accepted rows carry their row number under ``_row`` and are already redacted where a field's PII policy
    says so. ``checks`` holds every check run on the split (count 0 when it found nothing), quarantining or not.
    """

    name: str
    path: str
    sha256: str
    format: str = "jsonl"
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    check_counts: Counter = field(default_factory=Counter)
    checks: dict[str, CheckStat] = field(default_factory=dict)
    rows_in: int = 0
    accepted_count: int = 0
    label_counts: Counter = field(default_factory=Counter)
    token_lengths: list[int] = field(default_factory=list)
    # Quarantined rows that are in another known format (chat rows for a task contract, DPO pairs for chat...).
    format_hints: Counter = field(default_factory=Counter)

    @property
    def rows_accepted(self) -> int:
        """Rows that passed every check (counted even when the rows themselves are not kept)."""
        return self.accepted_count

    @property
    def rows_quarantined(self) -> int:
        """Rows set aside with reasons."""
        return len(self.quarantined)

    def note(
        self, check: str, action: str, row: int, pair: dict[str, Any] | None = None, by: Counter | None = None
    ) -> None:
        """Record one row found by a check (``by``: a breakdown such as PII entity counts)."""
        stat = self.checks.setdefault(check, CheckStat(action))
        stat.count += 1
        if len(stat.examples) < EXAMPLES:
            stat.examples.append(row)
        if pair is not None:
            stat.add_pair(pair)
        if by:
            stat.by.update(by)

    def all_pairs(self) -> Iterator[dict[str, Any]]:
        """validation/pairs.jsonl lines: every duplicate/leakage pair of this split, with its split and check."""
        for check, stat in sorted(self.checks.items()):
            for pair in stat.all_pairs():
                yield {"split": self.name, "check": check, **pair}

    def summary(self) -> dict[str, Any]:
        """The per-split part of report.json."""
        out = {
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
            "quarantined_fraction": round(self.rows_quarantined / self.rows_in, 6) if self.rows_in else 0.0,
            "failed_checks": dict(sorted(self.check_counts.items())),
            "checks": {name: stat.to_dict() for name, stat in sorted(self.checks.items())},
        }
        if self.label_counts:
            counts = self.label_counts.most_common()
            out["labels"] = {
                "distinct": len(counts),
                "total": sum(self.label_counts.values()),
                "most_common": dict(counts[:20]),
                "least_common": dict(counts[-10:]),
                "imbalance_ratio": round(counts[0][1] / counts[-1][1], 3),
            }
        if self.token_lengths:
            ordered = sorted(self.token_lengths)
            n = len(ordered)
            out["tokens"] = {
                "min": ordered[0],
                "p50": ordered[n // 2],
                "p95": ordered[min(n - 1, (n * 95) // 100)],
                "max": ordered[-1],
                "mean": round(sum(ordered) / n, 1),
            }
        return out


# measure_tokens(rows) -> [(prompt_tokens, example_tokens)] for rows rendered as training examples.
# (prompt tokens, whole example) per row; a chat row its template cannot render gives the TemplateProblem instead.
TokenCounter = Callable[[list[dict[str, Any]]], list[tuple[int, int] | chat.TemplateProblem]]


@dataclass
class _Accepted:
    """Per accepted row, what the dataset checks need (not the row: flat memory when rows are not kept)."""

    rows: array = field(default_factory=lambda: array("q"))
    ids: list[Any] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)
    tokens: array = field(default_factory=lambda: array("l"))
    signatures: list[Any] = field(default_factory=list)  # per batch: (rows, num_perm) uint16
    keys: list[Any] = field(default_factory=list)  # per batch: (rows, bands) uint64 LSH band keys


class ContractRun:
    """Checks splits against a contract, streaming: train first, then eval (which is checked against train).

    Per record: parse -> row checks -> PII scan (block / redact / warn) -> token counts -> exact duplicates
    (within the split; for eval also against train) -> accepted. After a split's last record: near-duplicates
    within it and, for eval, leakage from train; after both: label coverage and minimum row counts.

    Args:
        contract: The contract.
        measure_tokens: Token counter for the contract's ``tokens`` rules (None: token checks skipped).
        max_length: ``training.max_length``, the default ``tokens.max_tokens``.
        keep_rows: Keep the accepted rows (training needs them; the benchmark measures without).
    """

    def __init__(
        self,
        contract: DataContract,
        measure_tokens: TokenCounter | None = None,
        max_length: int | None = None,
        keep_rows: bool = True,
    ):
        self.contract = contract
        self.rules = contract.dataset
        self.measure_tokens = measure_tokens if contract.tokens else None
        self.max_tokens = (contract.tokens.max_tokens if contract.tokens else None) or max_length
        self.keep_rows = keep_rows
        self.pii_fields = {name: rule.pii for name, rule in contract.fields.items() if rule.pii}
        self.conversation = contract.conversation
        if self.conversation is not None and self.conversation.pii:
            self.pii_fields["messages"] = self.conversation.pii  # every message's text and tool-call arguments
        self.scanner: Any = None
        if self.pii_fields:
            self.scanner = pii_scanner(tuple(contract.pii.entities), contract.pii.min_score)
        self.hasher = MinHasher(shingle=self.rules.shingle_words) if self.rules.text_fields else None
        self.near = self.hasher is not None and (self.rules.near_duplicates != "off" or self.rules.leakage != "off")
        self.splits: dict[str, SplitResult] = {}
        self._hashes: dict[str, dict[int, int]] = {}
        self._accepted: dict[str, _Accepted] = {}
        self._train_index: LshIndex | None = None
        self._label_sets: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Eval rows found to be exact copies of a train row, so near-duplicate leakage does not count them again
        # (every one of them, not only those among the report's first PAIRS pairs).
        self._exact_leaks: set[int] = set()
        self._passes = row_passes(contract)
        self._field_types = {name: rule.type for name, rule in contract.fields.items()}
        self._batches = 0

    # -- one split -------------------------------------------------------------------------------
    def split(self, name: str, path: str | Path) -> SplitResult:
        """Check one split file (call with train before eval; the eval result is final after ``finish``)."""
        path = Path(path)
        result = SplitResult(
            name=name, path=str(path), sha256=sha256_file(path), format=file_format(path, self.contract.format)
        )
        self.splits[name] = result
        for check, action in self._checks_run(name, result.format).items():  # listed in the report even at 0
            result.checks[check] = CheckStat(action)
        self._hashes[name] = {}
        self._accepted[name] = _Accepted()
        batch: list[Record] = []
        passes = self._passes
        # The cyclic garbage collector is paused while streaming: each batch of 2,048 parsed rows survives a few
        # young collections, which then trigger full ones that walk every object in the process, the ICD-10-CM
        # table's included (benchmarks/contracts.md has the cost). Parsed rows hold no cycles and are freed by
        # reference counting; every 64 batches a young-generation collection reclaims any cycles the PII scanner
        # leaves, without walking the old generation.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for record in iter_records(path, self.contract.format, self.contract.max_row_bytes, self._field_types):
                result.rows_in += 1
                if self.conversation is not None and not record.reasons:
                    record.value, record.reasons = conversation_row(record.value, self.contract)
                reasons = record.reasons or (None if passes(record.value) else check_row(record.value, self.contract))
                if reasons:
                    self._quarantine(result, record.row, record.value, reasons)
                    hint = self._format_hint(record.value)
                    if hint is not None:
                        result.format_hints[hint] += 1
                    continue
                batch.append(record)
                if len(batch) >= BATCH:
                    self._batch(result, batch)
                    batch = []
                    self._batches += 1
                    if self._batches % 64 == 0:
                        gc.collect(1)
            self._batch(result, batch)
            self._near_duplicates(result)
        finally:
            if collecting:
                gc.enable()
        if name == "train":
            self._finalize(result)
        return result

    def _checks_run(self, name: str, fmt: str) -> dict[str, str]:
        """Every check this contract runs on a split of this name and format, with its action."""
        checks = dict.fromkeys(READ_CHECKS[fmt], "quarantine")
        rules = list(self.contract.fields.values())
        while rules:
            rule = rules.pop()
            checks["type"] = "quarantine"
            if rule.required:
                checks["required"] = "quarantine"
            named = {
                "pattern": rule.pattern is not None,
                "enum": rule.enum is not None,
                "vocabulary": rule.vocabulary is not None or rule.vocabulary_file is not None,
                "billable": rule.billable_only,
                "min_length": rule.min_length is not None,
                "max_length": rule.max_length is not None,
                "min_items": rule.min_items is not None,
                "max_items": rule.max_items is not None,
                "unique_items": rule.unique_items,
                "pii": rule.pii == "block",
            }
            checks.update((check, "quarantine") for check, on in named.items() if on)
            if rule.items is not None:
                rules.append(rule.items)
        if self.contract.extra_fields == "reject":
            checks["extra_fields"] = "quarantine"
        if self.conversation is not None:
            checks.update((check, "quarantine") for check in chat.CHECKS)
        checks.update((f"pii_{policy}", policy) for policy in self.pii_fields.values())
        if self.measure_tokens is not None:
            checks.update(min_tokens="quarantine", max_tokens="quarantine")
        rules_ = self.rules
        if rules_.text_fields and rules_.exact_duplicates != "off":
            checks["exact_duplicate"] = rules_.exact_duplicates
        if self.near and rules_.near_duplicates != "off":
            checks["near_duplicate"] = rules_.near_duplicates
        if name == "eval" and rules_.text_fields and rules_.leakage != "off":
            checks["leakage"] = rules_.leakage
        if name == "eval" and rules_.label_field and rules_.label_coverage != "off":
            checks["label_coverage"] = rules_.label_coverage
        return checks

    def _batch(self, result: SplitResult, records: list[Record]) -> None:
        if not records:
            return
        # The PII scan (redact) and token counts write into the row; without them the parsed dict is used as is.
        mutates = self.scanner is not None or self.measure_tokens is not None
        rows = [dict(r.value) for r in records] if mutates else [r.value for r in records]
        reasons: list[list[Reason]] = [[] for _ in records]
        if self.scanner is not None:
            for i, (record, row) in enumerate(zip(records, rows, strict=True)):
                reasons[i] = self._scan(result, record.row, row)
        if self.measure_tokens is not None:
            live = [i for i, r in enumerate(reasons) if not r]
            unrendered: list[tuple[int, str]] = []
            for i, counted in zip(live, self.measure_tokens([rows[i] for i in live]), strict=True):
                if isinstance(counted, chat.TemplateProblem):
                    unrendered.append((records[i].row, str(counted)))
                    continue
                prompt, total = counted
                reasons[i] += self._token_reasons(prompt, total)
                rows[i]["_tokens"] = total
            if unrendered:
                raise TemplateCannotRender(result.path, unrendered)
        seen, train_seen = self._hashes[result.name], self._hashes.get("train") if result.name == "eval" else None
        texts: list[str] = []
        accepted = self._accepted[result.name]
        # Bound once per batch, not looked up per row: attribute lookups were a measurable part of this loop.
        leakage, exact = self.rules.leakage, self.rules.exact_duplicates
        text_of, row_id, labels_of, keep_rows = self._text, self._row_id, self._labels, self.keep_rows
        near, id_field = self.near, self.contract.id_field
        add_row, add_id, add_labels = accepted.rows.append, accepted.ids.append, accepted.labels.append
        for record, row, why in zip(records, rows, reasons, strict=True):
            normalized = text_of(row)
            number = record.row
            if not why and normalized is not None:
                digest = text_hash(normalized)
                if train_seen is not None and digest in train_seen and leakage != "off":
                    pair = {"row": number, "train_row": train_seen[digest], "similarity": 1.0}
                    result.note("leakage", leakage, number, pair)
                    self._exact_leaks.add(number)
                    if leakage == "quarantine":
                        message = f"same text as train row {train_seen[digest]} after normalization"
                        why.append(Reason("leakage", self._text_field, message))
                first = seen.setdefault(digest, number)  # kept even when off: eval leakage looks train up
                if first != number and exact != "off":
                    pair = {"row": number, "duplicate_of": first}
                    result.note("exact_duplicate", exact, number, pair)
                    if exact == "quarantine":
                        message = f"same text as row {first} after normalization (case, whitespace, punctuation)"
                        why.append(Reason("exact_duplicate", self._text_field, message))
            if why:
                self._quarantine(result, number, row, why)
                continue
            tokens = row.pop("_tokens", None)
            add_row(number)
            value = row.get(id_field) if id_field else None
            add_id(value if type(value) is str or type(value) is int else row_id(row))  # exact types: the common case
            add_labels(labels_of(row))
            if tokens is not None:
                accepted.tokens.append(tokens)
            if near and normalized is not None:
                texts.append(normalized)
            if keep_rows:
                result.rows.append({**row, "_row": number})
        if texts:
            signatures = self.hasher.signatures(texts)
            accepted.keys.append(self.hasher.band_keys(signatures))
            # b-bit MinHash (Li and Koenig): the top 16 bits of each value estimate the similarity with a bias of
            # (1 - J) / 65536, and halve the memory that dominates at 1M rows (128 bytes a row instead of 256).
            accepted.signatures.append((signatures >> 16).astype(np.uint16))

    def _scan(self, result: SplitResult, row_number: int, row: dict[str, Any]) -> list[Reason]:
        reasons = []
        for name, policy in self.pii_fields.items():
            value = row.get(name)
            if self.conversation is not None and name == "messages":
                entities = self._scan_conversation(row, policy)
                if not entities:
                    continue
            else:
                if not isinstance(value, str):
                    continue
                findings = self.scanner.scan(value)
                if not findings:
                    continue
                entities = Counter(f.entity for f in findings)
            result.note(
                f"pii_{policy}", policy, row_number, by=Counter({f"{name}:{e}": n for e, n in entities.items()})
            )
            found = ", ".join(f"{entity} x{count}" for entity, count in sorted(entities.items()))
            if policy == "block":
                reasons.append(Reason("pii", name, f"{found} found; the field's pii policy is block"))
            elif policy == "redact" and name != "messages":
                row[name] = redact(value, findings)
        return reasons

    def _scan_conversation(self, row: dict[str, Any], policy: str) -> Counter:
        """PII in every message's text and tool call's arguments; a redact policy redacts them in ``row``."""
        entities: Counter = Counter()

        def visit(text: str) -> str:
            findings = self.scanner.scan(text)
            if not findings:
                return text
            entities.update(f.entity for f in findings)
            return redact(text, findings) if policy == "redact" else text

        redacted = chat.map_texts(row, visit)
        if policy == "redact" and entities:
            row["messages"] = redacted["messages"]
        return entities

    def _format_hint(self, value: Any) -> str | None:
        """Which other format a quarantined row is in (a chat file given to a task contract, or the reverse)."""
        if self.conversation is not None:
            return chat.looks_like(value)
        if isinstance(value, dict) and isinstance(value.get("messages"), list):
            return (
                "OpenAI's chat fine-tuning format (messages): use task: chat with data_contracts/openai_chat.yaml "
                "(recipes/openai_migration_quickstart.yaml shows one)"
            )
        return None

    def _token_reasons(self, prompt: int, total: int) -> list[Reason]:
        rules = self.contract.tokens
        assert rules is not None
        if self.max_tokens is not None and total > self.max_tokens:
            cut = "all of the completion" if prompt >= self.max_tokens else f"{total - self.max_tokens} tokens of it"
            return [
                Reason(
                    "max_tokens",
                    None,
                    f"example is {total} tokens (prompt {prompt} + completion {total - prompt}), above max_tokens "
                    f"{self.max_tokens}: truncation would cut {cut}, so the labels would be lost",
                )
            ]
        if total < rules.min_tokens:
            return [Reason("min_tokens", None, f"example is {total} tokens, at least {rules.min_tokens} required")]
        return []

    @property
    def _text_field(self) -> str | None:
        return "+".join(self.rules.text_fields) or None

    def _text(self, row: dict[str, Any]) -> str | None:
        fields = self.rules.text_fields
        return dedup_text(row, fields, self.conversation is not None) if fields else None

    def _row_id(self, row: Any) -> str | int | None:
        value = row.get(self.contract.id_field) if isinstance(row, dict) and self.contract.id_field else None
        return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None

    def _labels(self, row: dict[str, Any]) -> tuple[str, ...]:
        field_name = self.rules.label_field
        if field_name is None:
            return ()
        value = row.get(field_name)
        raw = tuple(value) if isinstance(value, list) else (value,)
        # Keys are all-str tuples and no other JSON value equals a str: a hit is exactly the converted tuple.
        shared = self._label_sets.get(raw)
        if shared is not None:
            return shared
        labels = tuple(v if type(v) is str else json.dumps(v, sort_keys=True) for v in raw)
        # One shared tuple per distinct label set: a million rows carry a few thousand combinations.
        return self._label_sets.setdefault(labels, labels)

    def _quarantine(self, result: SplitResult, row_number: int, row: Any, reasons: list[Reason]) -> None:
        result.quarantined.append(
            {
                "split": result.name,
                "row": row_number,
                "id": _printable(self._row_id(row)),
                "reasons": [r.to_dict() for r in reasons],
            }
        )
        checks = {r.check for r in reasons}
        result.check_counts.update(checks)
        for check in checks:
            if check not in _NOTED_BY_CHECK:  # those were noted where found: once per row, not twice
                result.note(check, "quarantine", row_number)

    # -- after a split ---------------------------------------------------------------------------
    def _near_duplicates(self, result: SplitResult) -> None:
        accepted = self._accepted[result.name]
        if not self.near or not accepted.signatures:
            return
        signatures = np.concatenate(accepted.signatures)
        accepted.signatures = [signatures]
        keys = np.concatenate(accepted.keys)
        accepted.keys = []
        threshold = self.rules.near_duplicate_threshold
        late: dict[int, list[Reason]] = {}
        if result.name == "eval" and self._train_index is not None and self.rules.leakage != "off":
            train_rows = self._accepted["train"].rows
            for q, m, s in self._train_index.query(keys, signatures, threshold):
                row, train_row = accepted.rows[q], train_rows[m]
                if row in self._exact_leaks:
                    continue
                result.note("leakage", self.rules.leakage, row, {"row": row, "train_row": train_row, "similarity": s})
                if self.rules.leakage == "quarantine":
                    message = f"near-duplicate of train row {train_row} (estimated similarity {s:.2f} >= {threshold})"
                    late.setdefault(q, []).append(Reason("leakage", self._text_field, message))
        if self.rules.near_duplicates != "off":
            for later, earlier, s in pairs_within(keys, signatures, threshold):
                row, first = accepted.rows[later], accepted.rows[earlier]
                pair = {"row": row, "similar_to": first, "similarity": round(s, 3)}
                result.note("near_duplicate", self.rules.near_duplicates, row, pair)
                if self.rules.near_duplicates == "quarantine":
                    message = f"near-duplicate of row {first} (estimated similarity {s:.2f} >= {threshold})"
                    late.setdefault(later, []).append(Reason("near_duplicate", self._text_field, message))
        if result.name == "train" and self.rules.leakage != "off":
            self._train_index = LshIndex.build(keys, signatures)
        self._late_quarantine(result, late)

    def _late_quarantine(self, result: SplitResult, late: dict[int, list[Reason]]) -> None:
        """Move accepted rows (by position) to quarantine after a dataset-level check."""
        if not late:
            return
        accepted = self._accepted[result.name]
        for position, reasons in late.items():
            self._quarantine(result, accepted.rows[position], {}, reasons)
            result.quarantined[-1]["id"] = accepted.ids[position]
        drop = {accepted.rows[p] for p in late}
        keep = [i for i, row in enumerate(accepted.rows) if row not in drop]
        accepted.rows = array("q", (accepted.rows[i] for i in keep))
        accepted.ids = [accepted.ids[i] for i in keep]
        accepted.labels = [accepted.labels[i] for i in keep]
        if len(accepted.tokens) == len(keep) + len(drop):
            accepted.tokens = array("l", (accepted.tokens[i] for i in keep))
        if accepted.signatures:
            accepted.signatures = [accepted.signatures[0][keep]]
        if self.keep_rows:
            result.rows = [r for r in result.rows if r["_row"] not in drop]

    def _finalize(self, result: SplitResult) -> None:
        accepted = self._accepted[result.name]
        result.accepted_count = len(accepted.rows)
        result.label_counts = Counter(label for labels in accepted.labels for label in labels)
        result.token_lengths = list(accepted.tokens)
        result.quarantined.sort(key=lambda q: q["row"])

    # -- after both splits -----------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Label coverage (eval vs train), then the dataset part of report.json."""
        train, evaluation = self.splits.get("train"), self.splits.get("eval")
        out: dict[str, Any] = {}
        if evaluation is not None:
            if train is not None and self.rules.label_field and self.rules.label_coverage != "off":
                out["label_coverage"] = self._coverage(train, evaluation)
            self._finalize(evaluation)
        if train is not None and train.label_counts:
            counts = train.label_counts
            rare = sorted((label for label, n in counts.items() if n < self.rules.rare_label_count), key=counts.get)
            out["rare_labels"] = {
                "below": self.rules.rare_label_count,
                "count": len(rare),
                "labels": {label: counts[label] for label in rare[:50]},
            }
            ratio = max(counts.values()) / min(counts.values())
            out["imbalance"] = {
                "ratio": round(ratio, 3),
                "max_ratio": self.rules.max_imbalance_ratio,
                "warning": self.rules.max_imbalance_ratio is not None and ratio > self.rules.max_imbalance_ratio,
            }
        if self.scanner is not None:
            out["pii"] = {
                "fields": self.pii_fields,
                "entities": self.scanner.entities,
                "unavailable": self.scanner.unavailable,
                "detector": "presidio-analyzer, pattern recognizers"
                + (f" + spaCy {self.scanner.model}" if self.scanner.model else " (no NLP model)"),
            }
        return out

    def _coverage(self, train: SplitResult, evaluation: SplitResult) -> dict[str, Any]:
        k = self.rules.min_train_count
        accepted = self._accepted["eval"]
        train_counts = Counter(label for labels in self._accepted["train"].labels for label in labels)
        uncovered: dict[str, dict[str, int]] = {}
        late: dict[int, list[Reason]] = {}
        for position, labels in enumerate(accepted.labels):
            missing = [label for label in labels if train_counts[label] < k]
            for label in missing:
                entry = uncovered.setdefault(label, {"train_count": train_counts[label], "eval_rows": 0})
                entry["eval_rows"] += 1
            if missing:
                row = accepted.rows[position]
                evaluation.note("label_coverage", self.rules.label_coverage, row, by=Counter(missing))
                if self.rules.label_coverage == "quarantine":
                    seen = ", ".join(f"{label} ({train_counts[label]}x)" for label in missing)
                    message = f"label(s) seen fewer than {k} times in train: {seen}; the model cannot learn them"
                    late[position] = [Reason("label_coverage", self.rules.label_field, message)]
        self._late_quarantine(evaluation, late)
        return {
            "action": self.rules.label_coverage,
            "min_train_count": k,
            "uncovered_labels": len(uncovered),
            "labels": dict(sorted(uncovered.items())[:100]),
        }


def dedup_text(row: dict[str, Any], fields: list[str], conversation: bool) -> str:
    """The normalized text that duplicates and leakage compare: ``fields`` joined by a space.

    In a conversation (``messages`` among the fields of a chat contract), the messages count as the conversation
    before its final answer (``chat.prompt_text``). ``split`` groups rows by this same text, so a file it splits
    passes this module's leakage check.
    """
    if conversation and "messages" in fields:
        others = " ".join(str(row.get(f) or "") for f in fields if f != "messages")
        return normalize(f"{chat.prompt_text(row)} {others}".strip())
    if len(fields) == 1:
        return normalize(str(row.get(fields[0]) or ""))
    return normalize(" ".join(str(row.get(f) or "") for f in fields))


def validate_split(name: str, path: str | Path, contract: DataContract) -> SplitResult:
    """Check one split on its own (no cross-split checks); see ``ContractRun`` for the whole contract."""
    run = ContractRun(contract)
    result = run.split(name, path)
    if name != "train":
        run.finish()
    return result


def build_report(
    contract_path: str | Path, contract: DataContract, splits: list[SplitResult], dataset: dict[str, Any] | None = None
) -> dict[str, Any]:
    """report.json: per split counts that reconcile, content hashes, every check with its count and examples."""
    contract_bytes = Path(contract_path).read_bytes()
    return {
        "contract": {
            "name": contract.name,
            "version": contract.version,
            "path": str(contract_path),
            "sha256": hashlib.sha256(contract_bytes).hexdigest(),
        },
        "splits": {s.name: s.summary() for s in splits},
        "dataset": dataset or {},
        "reconciled": all(s.rows_in == s.rows_accepted + s.rows_quarantined for s in splits),
    }


def over_threshold(
    contract: DataContract, splits: list[SplitResult], quarantine: str | Path = "validation/quarantine.jsonl"
) -> list[str]:
    """Messages for splits whose quarantined fraction, emptiness or size should stop the job.

    ``quarantine``: the quarantine file the messages point to (the run's ``validation/quarantine.jsonl``).
    """
    problems = []
    for split in splits:
        if split.rows_in == 0:
            problems.append(f"{split.path}: the {split.name} file is empty (no rows)")
            continue
        hint, count = split.format_hints.most_common(1)[0] if split.format_hints else (None, 0)
        if hint is not None and count * 2 > split.rows_in:
            problems.append(
                f"{split.path}: {count} of {split.rows_in} {split.name} rows look like {hint}; the contract "
                f"{contract.name} reads another format"
            )
            continue
        if split.rows_accepted == 0:
            failed = ", ".join(f"{check} x{n}" for check, n in split.check_counts.most_common(3))
            problems.append(
                f"{split.path}: no row of the {split.name} split passed the contract ({failed}); see {quarantine}"
            )
            continue
        fraction = split.rows_quarantined / split.rows_in
        if fraction > contract.max_quarantine_fraction:
            problems.append(
                f"{split.path}: {split.rows_quarantined} of {split.rows_in} {split.name} rows quarantined "
                f"({fraction:.1%}), above the contract's max_quarantine_fraction "
                f"{contract.max_quarantine_fraction:.1%}; see {quarantine}"
            )
        least = contract.dataset.min_rows.get(split.name)  # type: ignore[call-overload]
        if least is not None and split.rows_accepted < least:
            problems.append(
                f"{split.path}: {split.rows_accepted} accepted {split.name} rows, fewer than the contract's "
                f"dataset.min_rows.{split.name} {least}"
            )
    return problems


class TemplateCannotRender(UsageError):
    """The base's chat template cannot render some rows (tool calls, tools, or a turn order it refuses)."""

    def __init__(self, path: str, rows: list[tuple[int, str]]):
        shown = ", ".join(str(r) for r, _ in rows[:10]) + (f", ... {len(rows) - 10} more" if len(rows) > 10 else "")
        super().__init__(
            f"{path}: rows {shown}: {rows[0][1]}. Nothing was trained; the token checks render every row through "
            "the base's chat template, as training will"
        )


def _printable(row_id: str | int | None) -> str | int | None:
    """An id as quarantine.jsonl can hold it: a lone surrogate in it is written as its escape."""
    if type(row_id) is str and not utf8_ok(row_id):
        return row_id.encode("utf-8", "backslashreplace").decode("utf-8")
    return row_id
