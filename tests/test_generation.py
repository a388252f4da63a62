"""Local generation on a tiny real model: EOS ends an answer, the max_new_tokens cut is counted, and batching
with left padding gives the answers of one-at-a-time generation."""

from __future__ import annotations

import json

import pytest

from pipeline.evaluate import score_system
from pipeline.generation import generate
from pipeline.tasks import get_task

TASK = get_task("medical_coding")
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(tiny_assets):
    """The session's tiny random Llama in fp32, 7 eval prompts, and each prompt's greedy tokens (reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data import prompt_input_ids, sft_example
    from pipeline.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    lines = (tiny_assets["data"] / "eval.jsonl").read_text().splitlines()[:7]
    rows = [{**json.loads(line), "_row": i + 1} for i, line in enumerate(lines)]
    examples = [sft_example(row, TASK, "plain") for row in rows]
    # The reference is a plain greedy loop, one prompt at a time, no padding and no stop: argmax of the last
    # position's logits, appended, MAX_NEW times.
    reference = []
    with torch.inference_mode():
        for ex in examples:
            ids = torch.tensor([prompt_input_ids(tokenizer, ex)])
            new = []
            for _ in range(MAX_NEW):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            reference.append(new)
    lengths = {len(prompt_input_ids(tokenizer, ex)) for ex in examples}
    assert len(lengths) > 1  # prompts of different lengths, so a batch is really left-padded
    return model, tokenizer, rows, examples, reference


def test_an_answer_that_never_stops_is_cut_at_max_new_tokens_and_counted(setup):
    model, tokenizer, rows, examples, reference = setup
    used = {t for seq in reference for t in seq} | {tokenizer.pad_token_id}
    never = next(t for t in range(len(tokenizer)) if t not in used)
    out = generate(model, tokenizer, examples, max_new_tokens=MAX_NEW, batch_size=1, eos_ids={never})
    assert [o["stopped"] for o in out] == [False] * 7
    assert [o["tokens_out"] for o in out] == [MAX_NEW] * 7
    assert [o["text"] for o in out] == [tokenizer.decode(seq, skip_special_tokens=True) for seq in reference]
    assert score_system(TASK, rows, out)["cut_at_max_new_tokens"] == 7


def test_eos_ends_the_answer_and_batching_with_left_padding_changes_nothing(setup):
    model, tokenizer, rows, examples, reference = setup
    eos = reference[0][3]  # a token the model produces: it now ends answers, wherever it first comes
    expected = []
    for seq in reference:
        stop = seq.index(eos) if eos in seq else None
        kept = seq if stop is None else seq[:stop]
        expected.append(
            (tokenizer.decode(kept, skip_special_tokens=True), stop is not None, len(kept) + (stop is not None))
        )
    assert expected[0][1] is True and expected[0][2] <= 4
    runs = {
        size: generate(model, tokenizer, examples, max_new_tokens=MAX_NEW, batch_size=size, eos_ids={eos})
        for size in (1, 3, 7)
    }
    for size, out in runs.items():
        assert [(o["text"], o["stopped"], o["tokens_out"]) for o in out] == expected, size
    # Stopped answers are not counted as cut; the ones that never met the EOS are.
    cut = sum(not stopped for _, stopped, _ in expected)
    assert score_system(TASK, rows, runs[7])["cut_at_max_new_tokens"] == cut
