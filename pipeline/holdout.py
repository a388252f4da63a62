"""``split``: one data file into train and eval, with no leakage between them.

An OpenAI fine-tuning job often had only a training file. Taking every tenth line as eval would put copies and
near copies of training rows in eval, and the contract's leakage check would then quarantine them (or, off,
inflate the score). Here rows are grouped first, and a group goes to one side whole:

1. every row gets the text the contract's duplicate and leakage checks compare (``splits.dedup_text``: the
   contract's ``dataset.text_fields``; for a chat file the conversation before its final answer);
2. rows with the same normalized text, and rows whose MinHash estimate of word-shingle similarity reaches the
   threshold, are joined into one group (union-find over the candidate pairs LSH finds);
3. groups are shuffled with the seed and taken into eval until it holds ``eval_fraction`` of the rows (a group
   that would overshoot is left in train, so large clusters of templated rows train the model);
4. eval is checked against train exactly as ``validate`` checks it (the same hashes, signatures and index); an
   eval row that still matches a train row takes its group back to train, until nothing matches.

Rows that cannot be read (not JSON) or have no text to compare (a chat row that fails OpenAI's checks, a row
without the text field) are written to train, where ``validate`` quarantines them with their line numbers: the
split loses nothing. The outputs keep the input's format and each row as it was; a manifest records the counts,
the seed and the SHA-256 of the input and of each output.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import chat
from pipeline.contracts import DataContract, load_contract
from pipeline.dedup import LshIndex, MinHasher, pairs_within, text_hash
from pipeline.errors import UsageError
from pipeline.records import DataFileError, file_format, iter_records
from pipeline.rundir import atomic_open, sha256_file, write_json
from pipeline.splits import dedup_text

MANIFEST = "split_manifest.json"
# The contract defaults (contracts.DatasetRules): a split without a contract groups as validate would compare.
DEFAULT_THRESHOLD = 0.8
DEFAULT_SHINGLE = 3
MAX_ROW_BYTES = 16 << 20
_SIGNATURE_BATCH = 4096


class SplitRefused(UsageError):
    """The file cannot be split as asked (nothing was written)."""


@dataclass(frozen=True)
class TextSpec:
    """What a row's compared text is made of, and where that choice came from (the manifest records it)."""

    fields: list[str]
    conversation: bool
    threshold: float
    shingle: int
    source: str


@dataclass
class _Rows:
    """Per input record, in file order: its text hash, or None when it has no text (it stays in train)."""

    count: int = 0
    readable: list[int] = field(default_factory=list)  # record positions with text
    hashes: list[int] = field(default_factory=list)  # per readable position
    texts: list[str] = field(default_factory=list)  # per readable position (signatures are computed in batches)
    without_text: dict[str, int] = field(default_factory=dict)  # why -> rows
    first_lines: list[int] = field(default_factory=list)  # line numbers of the first rows without text


def split_file(
    path: str | Path,
    out_dir: str | Path,
    eval_fraction: float,
    seed: int = 0,
    contract_path: str | Path | None = None,
    text_fields: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Split ``path`` into ``out_dir/train.<ext>`` and ``out_dir/eval.<ext>``; returns the manifest.

    Args:
        path: A data file of any task (JSON Lines, CSV or Parquet).
        out_dir: Where the two splits and ``split_manifest.json`` go.
        eval_fraction: Share of the rows wanted in eval, in (0, 1). Groups are whole, so eval gets at most this.
        seed: Which groups go to eval; the same file, fraction and seed give the same split.
        contract_path: The contract whose ``dataset`` settings (text fields, threshold, shingle) define a
            duplicate; default: inferred from the rows (chat: the conversation; ``note``; ``text``).
        text_fields: Fields to compare, instead of the contract's or the inferred ones.
        force: Replace splits already in ``out_dir``.

    Raises:
        SplitRefused: Bad arguments, an unreadable file, no text field to compare, or too few rows.
    """
    source = Path(path)
    if not source.is_file():
        raise SplitRefused(f"{source}: no such file")
    if not 0 < eval_fraction < 1:
        raise SplitRefused(f"--eval-fraction {eval_fraction}: must be between 0 and 1, e.g. 0.1")
    contract = load_contract(contract_path) if contract_path is not None else None
    fmt = file_format(source, contract.format if contract is not None else "auto")
    out = Path(out_dir)
    paths = output_paths(out, fmt)
    targets = {name: paths[name] for name in ("train", "eval")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise SplitRefused(f"{', '.join(existing)} already exist(s); choose another --out or pass --force")
    if source.resolve() in {p.resolve() for p in targets.values()}:
        raise SplitRefused(f"{source}: --out would overwrite the input file; choose another --out")

    records = _read(source, fmt)
    spec = _spec(contract, contract_path, text_fields, records)
    rows = _texts(records, spec)
    n_readable = len(rows.readable)
    target = int(round(eval_fraction * n_readable))
    if target < 1 or target >= n_readable:
        raise SplitRefused(
            f"{source}: {n_readable} row(s) with text to compare; --eval-fraction {eval_fraction} leaves "
            f"{'no eval row' if target < 1 else 'no train row'} (choose a fraction that gives each side a row)"
        )

    hasher = MinHasher(shingle=spec.shingle)
    signatures, keys = _signatures(hasher, rows.texts)
    groups = _group(rows.hashes, keys, signatures, spec.threshold)
    in_eval = _assign(groups, target, seed)
    moved = _remove_leaks(groups, in_eval, rows.hashes, keys, signatures, spec.threshold)

    eval_positions = {rows.readable[i] for i in np.nonzero(in_eval)[0]}
    counts = _write(source, fmt, records, eval_positions, targets)
    sizes = np.bincount(groups)
    manifest = {
        "source": {"path": str(source), "sha256": sha256_file(source), "format": fmt, "rows": rows.count},
        "eval_fraction": eval_fraction,
        "seed": seed,
        "compared": {
            "text_fields": spec.fields,
            "conversation_before_final_answer": spec.conversation,
            "near_duplicate_threshold": spec.threshold,
            "shingle_words": spec.shingle,
            "from": spec.source,
        },
        "rows_with_text": n_readable,
        "rows_without_text": dict(rows.without_text),
        "rows_without_text_first_lines": rows.first_lines,
        "groups": {
            "count": int(len(sizes)),
            "with_copies": int((sizes > 1).sum()),
            "rows_in_groups_with_copies": int(sizes[sizes > 1].sum()),
            "largest": int(sizes.max()),
        },
        "eval_target_rows": target,
        "eval_fraction_reached": round(counts["eval"] / n_readable, 4),
        "moved_back_to_train_by_leakage_check": moved,
        "outputs": {
            name: {"path": str(p), "rows": counts[name], "sha256": sha256_file(p)} for name, p in targets.items()
        },
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def output_paths(out_dir: str | Path, fmt: str) -> dict[str, Path]:
    """The files ``split_file`` writes in ``out_dir`` for a source in format ``fmt``: train, eval, the manifest."""
    out, suffix = Path(out_dir), {"csv": ".csv", "parquet": ".parquet"}.get(fmt, ".jsonl")
    return {"train": out / f"train{suffix}", "eval": out / f"eval{suffix}", "manifest": out / MANIFEST}


@dataclass
class _Record:
    value: Any  # the parsed row, or None when it could not be read
    line: int
    why: str | None  # why it could not be read


def _read(source: Path, fmt: str) -> list[_Record]:
    # CSV cells are compared (and written back) as the text they are: no contract types them here.
    try:
        return [
            _Record(r.value if not r.reasons else None, r.row, r.reasons[0].check if r.reasons else None)
            for r in iter_records(source, fmt, MAX_ROW_BYTES, {})  # type: ignore[arg-type]
        ]
    except DataFileError as exc:
        raise SplitRefused(str(exc)) from None


def _spec(
    contract: DataContract | None,
    contract_path: str | Path | None,
    text_fields: list[str] | None,
    records: list[_Record],
) -> TextSpec:
    threshold, shingle = DEFAULT_THRESHOLD, DEFAULT_SHINGLE
    if contract is not None:
        threshold, shingle = contract.dataset.near_duplicate_threshold, contract.dataset.shingle_words
    conversation_rows = sum(
        isinstance(r.value, dict) and isinstance(r.value.get("messages"), list) for r in records[:1000]
    )
    sample = [r.value for r in records[:1000] if isinstance(r.value, dict)]
    chat_file = bool(sample) and conversation_rows * 2 > len(sample)
    if text_fields:
        return TextSpec(list(text_fields), chat_file and "messages" in text_fields, threshold, shingle, "--text-field")
    if contract is not None and contract.dataset.text_fields:
        fields = list(contract.dataset.text_fields)
        conversation = contract.conversation is not None
        return TextSpec(fields, conversation, threshold, shingle, f"contract {contract_path}")
    if chat_file:
        return TextSpec(["messages"], True, threshold, shingle, "inferred: OpenAI chat rows (messages)")
    keys = set().union(*(row.keys() for row in sample)) if sample else set()
    for name in ("note", "text"):
        if name in keys:
            return TextSpec([name], False, threshold, shingle, f"inferred: the rows' {name!r} field")
    raise SplitRefused(
        f"cannot tell which field holds the text to compare (fields seen: {sorted(keys)[:12]}); pass "
        "--text-field NAME (repeatable) or --contract CONTRACT (its dataset.text_fields)"
    )


def _texts(records: list[_Record], spec: TextSpec) -> _Rows:
    rows = _Rows(count=len(records))
    for position, record in enumerate(records):
        why = record.why
        text = ""
        if why is None:
            value = record.value
            if not isinstance(value, dict):
                why = "not_an_object"
            elif spec.conversation:
                value, problems = chat.normalize(value)
                problems = problems or chat.check(value)
                why = f"chat:{problems[0][0]}" if problems else None
            if why is None:
                text = dedup_text(value, spec.fields, spec.conversation)
                if not text:
                    why = "no_text"
        if why is not None:
            rows.without_text[why] = rows.without_text.get(why, 0) + 1
            if len(rows.first_lines) < 20:
                rows.first_lines.append(record.line)
            continue
        record.value = None  # the text is all that is needed from here: flat memory on large files
        rows.readable.append(position)
        rows.hashes.append(text_hash(text))
        rows.texts.append(text)
    return rows


def _signatures(hasher: MinHasher, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    parts = [hasher.signatures(texts[i : i + _SIGNATURE_BATCH]) for i in range(0, len(texts), _SIGNATURE_BATCH)]
    signatures = np.concatenate(parts) if parts else np.zeros((0, hasher.num_perm), dtype=np.uint32)
    return signatures, hasher.band_keys(signatures)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _group(hashes: list[int], keys: np.ndarray, signatures: np.ndarray, threshold: float) -> np.ndarray:
    """Group id per row (0..groups-1, numbered by first row): exact copies and near-duplicate pairs joined."""
    n = len(hashes)
    sets = _UnionFind(n)
    first: dict[int, int] = {}
    for i, h in enumerate(hashes):
        sets.union(i, first.setdefault(h, i))
    for later, earlier, _ in pairs_within(keys, signatures, threshold):
        sets.union(later, earlier)
    roots = np.fromiter((sets.find(i) for i in range(n)), dtype=np.int64, count=n)
    _, groups = np.unique(roots, return_inverse=True)
    return groups


def _assign(groups: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Whole groups, in a seeded random order, into eval while they fit under ``target`` rows."""
    sizes = np.bincount(groups)
    order = np.random.default_rng(seed).permutation(len(sizes))
    chosen = np.zeros(len(sizes), dtype=bool)
    room = target
    for g in order:
        if sizes[g] <= room:
            chosen[g] = True
            room -= int(sizes[g])
            if room == 0:
                break
    return chosen[groups]


def _remove_leaks(
    groups: np.ndarray,
    in_eval: np.ndarray,
    hashes: list[int],
    keys: np.ndarray,
    signatures: np.ndarray,
    threshold: float,
) -> int:
    """Validate's leakage check on the split (exact hashes, then the LSH index of train); returns rows moved.

    Union-find over LSH candidate pairs misses a near pair only when LSH does; the check here is the very one
    ``validate`` runs, so a split it passes has no leakage that ``validate`` would report.
    """
    moved = 0
    hash_array = np.array(hashes, dtype=np.uint64)
    while True:
        train, evaluation = np.nonzero(~in_eval)[0], np.nonzero(in_eval)[0]
        leaking = set(np.nonzero(np.isin(hash_array[evaluation], hash_array[train]))[0].tolist())
        index = LshIndex.build(keys[train], signatures[train])
        leaking |= {q for q, _, _ in index.query(keys[evaluation], signatures[evaluation], threshold)}
        if not leaking:
            return moved
        back = np.isin(groups, np.unique(groups[evaluation[sorted(leaking)]]))
        moved += int((back & in_eval).sum())
        in_eval &= ~back


def _write(
    source: Path, fmt: str, records: list[_Record], eval_positions: set[int], targets: dict[str, Path]
) -> dict[str, int]:
    """Each record to its split, as it was in the input; returns the row count of each output."""
    counts = {"train": 0, "eval": 0}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        for name in ("train", "eval"):
            take = [i for i in range(len(records)) if (i in eval_positions) == (name == "eval")]
            with atomic_open(targets[name]) as handle:
                pq.write_table(table.take(take), handle)
            counts[name] = len(take)
        return counts
    if fmt == "csv":
        header, lines = _csv_raw(source)
        if len(lines) != len(records):
            raise SplitRefused(f"{source}: the CSV records could not be matched to its lines; convert it to JSONL")
        prefix = header
    else:
        lines = list(_jsonl_raw(source))
        prefix = b""
    with atomic_open(targets["train"]) as train, atomic_open(targets["eval"]) as evaluation:
        train.write(prefix)
        evaluation.write(prefix)
        for i, line in enumerate(lines):
            name = "eval" if i in eval_positions else "train"
            (evaluation if name == "eval" else train).write(line if line.endswith(b"\n") else line + b"\n")
            counts[name] += 1
    return counts


def _jsonl_raw(source: Path) -> Iterator[bytes]:
    with source.open("rb") as handle:
        yield from handle


def _csv_raw(source: Path) -> tuple[bytes, list[bytes]]:
    """The header line and each record's bytes (a quoted cell may span lines), as ``records`` numbers them."""
    text = source.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    lines = io.StringIO(text, newline="").readlines()  # the lines csv.reader sees, line endings kept
    reader = csv.reader(iter(lines))
    try:
        next(reader)
    except (StopIteration, csv.Error):
        return b"", []
    header_end = reader.line_num
    out: list[bytes] = []
    start = header_end
    while True:
        try:
            next(reader)
        except StopIteration:
            break
        except csv.Error:
            pass
        end = reader.line_num
        out.append("".join(lines[start:end]).encode("utf-8", errors="surrogateescape"))
        start = end
    header = "".join(lines[:header_end]).encode("utf-8", errors="surrogateescape")
    return header, out


def summary(manifest: dict[str, Any]) -> list[str]:
    """What ``split`` prints."""
    groups, outputs = manifest["groups"], manifest["outputs"]
    compared = manifest["compared"]
    what = (
        "the conversation before its final answer"
        if compared["conversation_before_final_answer"]
        else ("+".join(compared["text_fields"]))
    )
    lines = [
        f"split {manifest['source']['path']} ({manifest['source']['rows']:,} rows, seed {manifest['seed']}): "
        f"compared {what} ({compared['from']}), near-duplicate threshold {compared['near_duplicate_threshold']}",
        f"  {groups['count']:,} groups; {groups['with_copies']:,} with copies or near copies "
        f"({groups['rows_in_groups_with_copies']:,} rows, largest {groups['largest']}), each kept on one side",
        f"  train {outputs['train']['rows']:,} rows -> {outputs['train']['path']}",
        f"  eval  {outputs['eval']['rows']:,} rows -> {outputs['eval']['path']} "
        f"({manifest['eval_fraction_reached']:.1%} of rows with text; asked {manifest['eval_fraction']:.1%})",
    ]
    if manifest["moved_back_to_train_by_leakage_check"]:
        lines.append(f"  {manifest['moved_back_to_train_by_leakage_check']} row(s) moved back to train by the "
                     "leakage check")  # fmt: skip
    without = manifest["rows_without_text"]
    if without:
        first = ", ".join(map(str, manifest["rows_without_text_first_lines"][:5]))
        lines.append(
            f"  {sum(without.values()):,} row(s) without text to compare ({json.dumps(without)}; first at lines "
            f"{first}) are in train, where validate quarantines them with their reasons"
        )
    lines.append(f"  manifest: {Path(outputs['train']['path']).parent / MANIFEST}")
    return lines
