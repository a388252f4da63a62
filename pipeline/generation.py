"""Greedy local generation with the EOS rule, and the cache of local answers.

Generation is greedy, batched with left padding, and stops at an end-of-sequence token; an answer that
reaches ``max_new_tokens`` without one is cut there (``stopped`` False), since a fine-tune that never stops
is a failure worth seeing. ``greedy_decode`` is the one decoding loop: it takes token ids, so any caller
with a model and a tokenizer can use it; ``generate`` runs it on prompt/completion examples for evaluation.

Local answers are kept in ``eval/generations/<system>.jsonl`` keyed by what they depend on
(``generation_key``), so re-scoring reuses them (``cached_generations``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data import prompt_input_ids
from pipeline.recipe import EvalSection, Recipe

LOCAL_SYSTEMS = ("base", "finetuned")
GENERATIONS = "generations"  # eval/generations/<system>.jsonl


@dataclass
class LocalModel:
    """The trained PEFT model and what generation needs with it."""

    model: Any
    tokenizer: Any
    eos_ids: set[int]
    device: str


@dataclass(frozen=True)
class Decoded:
    """One prompt's greedy answer.

    Attributes:
        tokens: The new tokens up to and including the first EOS token (all of them when none came).
        stopped: An EOS token was produced (else the answer was cut at ``max_new_tokens``).
        text: The tokens before the EOS, decoded without special tokens.
        latency_s: Wall time of the batch the prompt was generated in.
        seconds: This prompt's share of that time (shares add up to the generation time).
    """

    tokens: list[int]
    stopped: bool
    text: str
    latency_s: float
    seconds: float


def greedy_decode(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: set[int],
    label: str = "",
    device: Any = None,
    pad_token_id: int | None = None,
    progress: bool = True,
) -> list[Decoded]:
    """Greedy answers for prompts given as token ids, in the order given, each cut at its first EOS.

    Prompts are sorted by length (less padding per batch), left-padded with the tokenizer's pad token (its
    EOS when it has none, or ``pad_token_id``) and generated in batches; one progress line per batch is printed
    unless ``progress`` is False.

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer (pad token and decoding).
        prompts: Token ids of each prompt.
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per ``generate`` call.
        eos_ids: Token ids that end an answer.
        label: Name shown in the progress lines.
        device: Where the inputs go; the device of the model's first parameter if None.
        pad_token_id: Padding (and ``generate``'s pad token) instead of the tokenizer's; export's verification
            pads with its smallest EOS id, as it always did.
        progress: Print a line per batch (export's verification, one prompt per batch, prints its own summary).

    Returns:
        One ``Decoded`` per prompt, in the order of ``prompts``.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device if device is not None else next(model.parameters()).device
    results: list[Decoded | None] = [None] * len(prompts)
    eos_list = sorted(eos_ids)
    done = 0
    start_all = time.perf_counter()
    for begin in range(0, len(order), batch_size):
        batch_idx = order[begin : begin + batch_size]
        width = max(len(prompts[i]) for i in batch_idx)
        input_ids = torch.full((len(batch_idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_idx), width), dtype=torch.long)
        for row, i in enumerate(batch_idx):
            ids = prompts[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_list,
                pad_token_id=pad_id,
                use_cache=True,
            )
        latency = time.perf_counter() - start
        for row, i in enumerate(batch_idx):
            new = out[row, width:].tolist()
            stop_at = next((k for k, t in enumerate(new) if t in eos_ids), None)
            kept = new if stop_at is None else new[:stop_at]
            results[i] = Decoded(
                tokens=new if stop_at is None else new[: stop_at + 1],
                stopped=stop_at is not None,
                text=tokenizer.decode(kept, skip_special_tokens=True),
                latency_s=latency,
                seconds=latency / len(batch_idx),
            )
        done += len(batch_idx)
        elapsed = time.perf_counter() - start_all
        if progress:
            print(f"  {label} generated {done}/{len(prompts)} ({done / elapsed:.1f} examples/s)", flush=True)
    return [r for r in results if r is not None]


def generate(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int,
    eos_ids: set[int],
    label: str = "",
) -> list[dict[str, Any]]:
    """Greedy answers for prompt/completion examples, in the order given.

    Prompts are tokenized exactly as in training and decoded by ``greedy_decode``.

    Returns:
        Per example: ``text`` (decoded answer), ``stopped`` (an EOS was produced), ``tokens_in``,
        ``tokens_out`` (the EOS included), ``latency_s`` (wall time of its batch) and ``seconds`` (its share of
        that time).
    """
    prompts = [prompt_input_ids(tokenizer, ex) for ex in examples]
    decoded = greedy_decode(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, eos_ids=eos_ids, label=label
    )
    return [
        {
            "text": d.text,
            "stopped": d.stopped,
            "tokens_in": len(ids),
            "tokens_out": len(d.tokens),
            "latency_s": d.latency_s,
            "seconds": d.seconds,
        }
        for ids, d in zip(prompts, decoded, strict=True)
    ]


def generate_local(loaded: LocalModel, system: str, examples: list[dict[str, Any]], settings: EvalSection) -> list:
    """Greedy generation for ``base`` (the adapter switched off) or ``finetuned`` (on)."""
    model = loaded.model
    model.eval()
    # The base is the same 4-bit weights with the adapter switched off: no second copy in memory.
    switch = model.disable_adapter() if system == "base" else contextlib.nullcontext()
    with switch:
        return generate(
            model,
            loaded.tokenizer,
            examples,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            eos_ids=loaded.eos_ids,
            label=system,
        )


def generation_key(recipe: Recipe, system: str, example: dict[str, Any], adapter_sha: str | None) -> str:
    """What a local answer depends on: system, prompt, generation budget, base weights, quantization, adapter."""
    body = {
        "system": system,
        "prompt": example["prompt"],
        **({"tools": example["tools"]} if example.get("tools") else {}),  # absent: earlier tasks' keys unchanged
        "max_new_tokens": recipe.eval.max_new_tokens,
        "model": [recipe.model.path, recipe.model.revision],
        "quantization": recipe.quantization.model_dump(mode="json"),
        "adapter": adapter_sha if system == "finetuned" else None,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_generations(path: Path, keys: list[str]) -> list[dict[str, Any]] | None:
    """The cached answers for exactly these keys, in order, or None if any is missing."""
    if not path.is_file():
        return None
    by_key = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            by_key[entry.pop("key")] = entry
    if not all(k in by_key for k in keys):
        return None
    return [by_key[k] for k in keys]
