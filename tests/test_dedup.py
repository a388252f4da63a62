"""Normalization, MinHash estimates and the LSH index used for duplicates and train/eval leakage."""

import random

import numpy as np
import pytest

from pipeline.dedup import LshIndex, MinHasher, normalize, pairs_within, similarity, text_hash


def test_normalize_ignores_case_whitespace_and_punctuation():
    assert normalize("  Pt has   HTN.\r\n Don't stop! ") == "pt has htn don t stop"
    assert text_hash(normalize("Pt has HTN.")) == text_hash(normalize("pt  has htn"))
    assert text_hash(normalize("Pt has HTN.")) != text_hash(normalize("Pt has DM."))


def shingles(words, n=3):
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_minhash_estimates_jaccard_within_its_standard_error():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    hasher = MinHasher()
    errors = []
    for _ in range(150):
        a = [rng.choice(vocab) for _ in range(40)]
        b = list(a)
        for _ in range(rng.randint(0, 20)):
            b[rng.randrange(40)] = rng.choice(vocab)
        true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
        sig = hasher.signatures([" ".join(a), " ".join(b)])
        errors.append(abs(float(similarity(sig[:1], sig[1:])[0]) - true))
    # standard error sqrt(J(1-J)/64) <= 0.0625; the mean absolute error of a normal estimate is ~0.8 of it
    assert np.mean(errors) < 0.06 and max(errors) < 0.25


def test_short_and_empty_texts_get_signatures():
    sig = MinHasher().signatures(["a b", "x", "", "a b"])
    assert sig.shape == (4, 64) and (sig[0] == sig[3]).all() and not (sig[0] == sig[1]).all()


def test_pairs_within_and_index_query_find_planted_near_duplicates():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(300)]
    texts.append(texts[10] + " w1")  # 301st: near-duplicate of row 10 (28 of 29 shingles shared)
    hasher = MinHasher()
    sig = hasher.signatures(texts)
    keys = hasher.band_keys(sig)
    pairs = pairs_within(keys, sig, 0.8)
    assert [(a, b) for a, b, _ in pairs] == [(300, 10)] and pairs[0][2] == pytest.approx(28 / 29, abs=0.15)
    index = LshIndex.build(keys[:300], sig[:300])
    queries = hasher.signatures([texts[42] + " w7 w8", " ".join(rng.choice(vocab) for _ in range(30))])
    hits = index.query(hasher.band_keys(queries), queries, 0.8)
    assert [(q, m) for q, m, _ in hits] == [(0, 42)]
