"""Duplicates and near-duplicates: normalized text hashes and a vectorized MinHash/LSH index.

Exact duplicates compare a 64-bit hash of the normalized text (lower case, punctuation removed, whitespace
collapsed), so ``"Pt has HTN."`` and ``"pt has  htn"`` are the same note. Near-duplicates compare word
n-gram shingles with MinHash (an unbiased estimate of Jaccard similarity) and find candidate pairs with
LSH banding, then keep the pairs whose estimated similarity reaches the threshold.

Why not datasketch's ``MinHash``/``MinHashLSH``: measured side by side in ``benchmarks/contracts.md``, they
hash shingle by shingle in Python and keep one Python dict entry per band per row, which misses the
20,000 rows/s and 1.5 GB targets at 1M rows. This index computes a whole batch of signatures with one numpy
expression and keeps band keys in flat arrays (``num_perm`` x 4 + ``bands`` x 8 bytes per row: 320 bytes
with the defaults). The hash family is multiply-shift (Dietzfelbinger et al.), which numpy evaluates exactly
in wrap-around uint64 arithmetic.

Leaf module: standard library and numpy only.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain

import numpy as np

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: ``" Pt has  HTN. "`` -> ``"pt has htn"``."""
    # Punctuation becomes a word break and runs of whitespace one space: the words joined by single spaces.
    if text.isascii():
        # Same result, faster: in ASCII, \w is [A-Za-z0-9_]; one bytes.translate lower-cases the letters and
        # turns every other character into a space, and bytes.split() (ASCII whitespace) finds the same words.
        return b" ".join(text.encode("ascii").translate(_ASCII_WORDS).split()).decode("ascii")
    return " ".join(_WORD.findall(text.lower()))


_ASCII_WORDS = bytes(ord(chr(c).lower()) if re.fullmatch(r"\w", chr(c)) else 32 for c in range(256))


def text_hash(normalized: str) -> int:
    """A stable 64-bit hash of normalized text (Python's ``hash`` changes per process)."""
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures for batches of texts.

    Args:
        num_perm: Hash functions per signature (the estimate's standard error is about sqrt(J(1-J)/num_perm):
            0.05 at J = 0.8 with 64).
        bands: LSH bands; ``num_perm`` must be a multiple. With 16 bands of 4 rows a pair of similarity s
            becomes a candidate with probability 1 - (1 - s^4)^16: 0.9998 at s = 0.8, 0.64 at s = 0.5
            (candidates are then checked against the threshold, so a low cut-off costs time, not accuracy).
        shingle: Words per shingle.
        seed: Seed of the hash functions (fixed: signatures must agree across splits and runs).
    """

    num_perm: int = 64
    bands: int = 16
    shingle: int = 3
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm {self.num_perm} is not a multiple of bands {self.bands}")
        rng = np.random.default_rng(self.seed)
        # Odd multipliers and any adders: h(x) = (a*x + b) >> 32 over uint64, a universal family for 32-bit x.
        object.__setattr__(self, "_a", rng.integers(1, 2**63, self.num_perm, dtype=np.uint64) | np.uint64(1))
        object.__setattr__(self, "_b", rng.integers(0, 2**63, self.num_perm, dtype=np.uint64))
        object.__setattr__(self, "_band_mix", rng.integers(1, 2**63, self.num_perm, dtype=np.uint64) | np.uint64(1))
        object.__setattr__(self, "_word_mix", rng.integers(1, 2**63, self.shingle, dtype=np.uint64) | np.uint64(1))
        object.__setattr__(self, "_word_hash", lru_cache(maxsize=1 << 20)(_crc))

    def signatures(self, normalized_texts: list[str]) -> np.ndarray:
        """``(len(texts), num_perm)`` uint32 signatures: per hash function, the minimum over the text's shingles.

        Words are hashed once (CRC-32, cached); a shingle of n words combines its word hashes with fixed odd
        multipliers, and the shingles of the whole batch are hashed and reduced in a few numpy passes. A text
        shorter than n words is one shingle of the words it has.
        """
        if not normalized_texts:
            return np.zeros((0, self.num_perm), dtype=np.uint32)
        word = self._word_hash
        # A text without words is one word that hashes to 0 (crc32 of b"" is 0). map/chain keep the per-word loop
        # in C: flattening with a generator expression cost as much as the hashing.
        per_text = [t.split() or [""] for t in normalized_texts]
        lengths = np.fromiter(map(len, per_text), dtype=np.int64, count=len(per_text))
        words = np.fromiter(map(word, chain.from_iterable(per_text)), dtype=np.uint64, count=int(lengths.sum()))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        n = self.shingle
        counts = np.maximum(lengths - n + 1, 1)  # shingles per text
        first = np.repeat(offsets, counts) + (
            np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        )
        end = np.repeat(offsets + lengths, counts)
        with np.errstate(over="ignore"):  # wrap-around is the point of multiply-shift hashing
            shingles = np.zeros(len(first), dtype=np.uint64)
            for t in range(n):
                index = first + t
                inside = index < end
                shingles[inside] += words[index[inside]] * self._word_mix[t]
            shingles = (shingles >> np.uint64(32)) ^ (shingles & np.uint64(0xFFFFFFFF))
            # (num_perm, shingles): each text's shingles are contiguous in a row, where reduceat is faster than
            # down the columns of the transposed layout (benchmarks/contracts.md).
            hashed = self._a[:, None] * shingles[None, :]
            hashed += self._b[:, None]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        # The shift is monotonic, so min(v >> 32) == min(v) >> 32: shift the small result, not every hash.
        minima = np.minimum.reduceat(hashed, starts, axis=1) >> np.uint64(32)
        return np.ascontiguousarray(minima.T, dtype=np.uint32)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """``(rows, bands)`` uint64 keys: rows whose keys agree in any band are candidate pairs."""
        rows = self.num_perm // self.bands
        with np.errstate(over="ignore"):
            mixed = signatures.astype(np.uint64) * self._band_mix[None, :]
            return mixed.reshape(len(signatures), self.bands, rows).sum(axis=2, dtype=np.uint64)


def _crc(word: str) -> int:
    return zlib.crc32(word.encode("utf-8"))


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of signature pairs (rows of ``a`` with rows of ``b``)."""
    return (a == b).mean(axis=1)


def pairs_within(keys: np.ndarray, signatures: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Near-duplicate pairs inside one set: ``(later, earlier, similarity)`` with ``later > earlier``.

    For each band, rows are sorted by key and each row in a bucket is compared with the bucket's first row
    (the earliest) and with the row just before it: linear in the bucket size even when thousands of
    templated notes share a bucket. Each later row is reported once, with its most similar earlier row.
    """
    best: dict[int, tuple[int, float]] = {}
    n = len(keys)
    if n < 2:
        return []
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.argsort(column, kind="stable")  # stable: equal keys stay in row order
        sorted_keys = column[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        if not same.any():
            continue
        # first index of each bucket, carried forward over the sorted order
        bucket_start = np.maximum.accumulate(np.where(np.concatenate(([True], ~same)), np.arange(n), 0))
        later_pos = np.nonzero(same)[0] + 1
        for earlier_pos in (bucket_start[later_pos], later_pos - 1):
            later, earlier = order[later_pos], order[earlier_pos]
            keep = later != earlier
            later, earlier = later[keep], earlier[keep]
            sims = similarity(signatures[later], signatures[earlier])
            for i in np.nonzero(sims >= threshold)[0]:
                a, b, s = int(later[i]), int(earlier[i]), float(sims[i])
                if a < b:
                    a, b = b, a
                if a not in best or s > best[a][1]:
                    best[a] = (b, s)
    return sorted((a, b, s) for a, (b, s) in best.items())


@dataclass
class LshIndex:
    """A frozen set's band keys, sorted per band, for querying another set against it (train vs eval)."""

    sorted_keys: np.ndarray  # (bands, n) keys sorted per band
    order: np.ndarray  # (bands, n) row index of each sorted key
    signatures: np.ndarray  # (n, num_perm)

    @classmethod
    def build(cls, keys: np.ndarray, signatures: np.ndarray) -> LshIndex:
        """Index ``keys`` (rows x bands) and their signatures."""
        n, bands = keys.shape
        order = np.empty((bands, n), dtype=np.int32)  # 4 bytes a row a band; one band sorted at a time
        sorted_keys = np.empty((bands, n), dtype=np.uint64)
        for band in range(bands):
            order[band] = np.argsort(keys[:, band], kind="stable")
            sorted_keys[band] = keys[order[band], band]
        return cls(sorted_keys, order, signatures)

    def query(self, keys: np.ndarray, signatures: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
        """``(query_row, indexed_row, similarity)`` for query rows with a near-duplicate in the index."""
        best: dict[int, tuple[int, float]] = {}
        n = self.sorted_keys.shape[1]
        if n == 0 or len(keys) == 0:
            return []
        for band in range(keys.shape[1]):
            pos = np.searchsorted(self.sorted_keys[band], keys[:, band])
            hit = pos < n
            hit[hit] = self.sorted_keys[band][pos[hit]] == keys[hit, band]
            queries = np.nonzero(hit)[0]
            matches = self.order[band][pos[queries]]
            sims = similarity(signatures[queries], self.signatures[matches])
            for i in np.nonzero(sims >= threshold)[0]:
                q, m, s = int(queries[i]), int(matches[i]), float(sims[i])
                if q not in best or s > best[q][1]:
                    best[q] = (m, s)
        return sorted((q, m, s) for q, (m, s) in best.items())
