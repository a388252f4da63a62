"""Serving an export: does the adapter load in vLLM as a LoRA adapter, and the commands that serve it.

vLLM is where most teams serve a LoRA adapter, and its LoRA loader refuses some adapters only when the first
request names them, long after the server started: adapters with ``modules_to_save`` (a module trained in full,
such as the quickstart's ``embed_tokens``), DoRA adapters (``use_dora``), and adapters whose rank is above the
server's ``--max-lora-rank`` (default 16; vLLM accepts only the values in ``VLLM_MAX_LORA_RANKS``). ``vllm_check``
applies these rules to the exported ``adapter_config.json`` so the export says it up front, without vLLM installed
(docs/serving.md; the rules are those of vLLM's PEFT helper and ``vllm/config/lora.py``).

An adapter vLLM refuses is served as the merged export (``export --merge``): the merge folds both the LoRA update
and every module trained in full into ordinary weights, which any server loads as a plain model.
"""

from __future__ import annotations

import shlex
from typing import Any

# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py); 16 is its default.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
LOADS = "loads in vLLM as a LoRA adapter"


def adapter_rank(config: dict[str, Any]) -> int:
    """The largest LoRA rank in an adapter config: ``r``, or a larger per-module rank from ``rank_pattern``."""
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``; None above the largest (512)."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def vllm_check(config: dict[str, Any]) -> dict[str, Any]:
    """Whether vLLM's LoRA loader accepts this adapter, and if not, why and what to do instead.

    Args:
        config: The adapter's ``adapter_config.json`` (PEFT).

    Returns:
        ``loads`` (bool), ``verdict`` (one line for the card and the terminal), ``reasons`` (one per refusal),
        ``rank`` (the adapter's largest rank), ``max_lora_rank`` (the smallest ``--max-lora-rank`` that holds it,
        None above 512) and ``instead`` (what to serve when it does not load).
    """
    rank = adapter_rank(config)
    max_rank = vllm_max_lora_rank(rank)
    reasons = []
    saved = config.get("modules_to_save") or []
    if saved:
        reasons.append(
            f"modules_to_save is {', '.join(map(str, saved))}: vLLM only loads adapters whose modules_to_save is "
            "empty (these modules were trained in full, which a LoRA adapter cannot carry in vLLM)"
        )
    if config.get("use_dora"):
        reasons.append("use_dora is true: vLLM does not load DoRA adapters")
    if max_rank is None:
        reasons.append(f"LoRA rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes")
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type is {config.get('peft_type')}: vLLM loads LoRA adapters only")
    loads = not reasons
    instead = None
    if not loads:
        instead = (
            "serve the merged export (export --merge writes OUT/merged/: base + adapter folded into ordinary "
            "weights, which vLLM and TGI load as a plain model)"
        )
    verdict = LOADS if loads else "does not load in vLLM as a LoRA adapter: " + "; ".join(reasons)
    if loads and max_rank != VLLM_DEFAULT_MAX_LORA_RANK:
        verdict += f" (with --max-lora-rank {max_rank}: its rank {rank} is not vLLM's default 16)"
    return {
        "loads": loads,
        "verdict": verdict,
        "reasons": reasons,
        "rank": rank,
        "max_lora_rank": max_rank,
        "instead": instead,
    }


def serving_commands(
    *, base: str, name: str, adapter_dir: str, merged_dir: str, max_lora_rank: int | None
) -> dict[str, str]:
    """The command lines that serve an export: the adapter on its base (vLLM, TGI), and the merged model.

    Args:
        base: The base model as the server finds it (the recipe's ``model.path``: a Hub id or a local directory).
        name: The name clients ask for (the export's model name).
        adapter_dir: The exported adapter directory (PEFT format).
        merged_dir: The merged model directory (written by ``export --merge``).
        max_lora_rank: ``--max-lora-rank`` for vLLM (``vllm_check``'s); None leaves the adapter commands out.
    """
    q = shlex.quote
    commands = {}
    if max_lora_rank is not None:
        commands["vllm_adapter"] = (
            f"vllm serve {q(base)} --enable-lora --lora-modules {q(f'{name}={adapter_dir}')} "
            f"--max-lora-rank {max_lora_rank}"
        )
        commands["tgi_adapter"] = (
            f"text-generation-launcher --model-id {q(base)} --lora-adapters {q(f'{name}={adapter_dir}')}"
        )
    commands["vllm_merged"] = f"vllm serve {q(merged_dir)} --served-model-name {q(name)}"
    commands["tgi_merged"] = f"text-generation-launcher --model-id {q(merged_dir)}"
    return commands


MERGED_STATES = {None: "not written (export --merge)", True: "verified", False: "failed verification"}


def serving_report(
    config: dict[str, Any], *, base: str, name: str, adapter_dir: str, merged_dir: str, merge_passed: bool | None = None
) -> dict:
    """``vllm_check`` plus the serving commands: the ``serving`` section of ``export_report.json``.

    The adapter commands are given only for an adapter vLLM loads. ``merged`` says whether the merged model was
    written and verified (``merge_passed``: None when this export has none), which decides its commands.
    """
    check = vllm_check(config)
    commands = serving_commands(
        base=base,
        name=name,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        max_lora_rank=check["max_lora_rank"] if check["loads"] else None,
    )
    return {"vllm": check, "commands": commands, "merged": MERGED_STATES[merge_passed]}


def merged_lines(serving: dict[str, Any]) -> tuple[str, list[str]]:
    """The heading and commands for the merged model: servable when verified, else what to do first."""
    commands, state = serving["commands"], serving.get("merged")
    pair = [commands["vllm_merged"], commands["tgi_merged"]]
    if state == "verified":
        return "Serve the merged model with vLLM or TGI:", pair
    if state == "failed verification":
        return "The merged model failed verification: do not serve it (see the verification above).", []
    return "The merged model, once `export --merge` has written and verified it:", pair


def render_serving(serving: dict[str, Any]) -> list[str]:
    """The serving lines ``export`` prints: vLLM's verdict on the adapter, and the commands that serve the export."""
    check, commands = serving["vllm"], serving["commands"]
    lines = [f"vLLM: the adapter {check['verdict']}."]
    if check["loads"]:
        lines += [
            "Serve the adapter on its base with vLLM (clients ask for the adapter's name as the model):",
            f"  {commands['vllm_adapter']}",
            "or with TGI (requests name it in parameters.adapter_id):",
            f"  {commands['tgi_adapter']}",
        ]
    else:
        lines.append(f"Instead: {check['instead']}.")
    heading, merged = merged_lines(serving)
    lines += [heading, *(f"  {c}" for c in merged)]
    return lines + ([NF4_NOTE] if check["loads"] else [])


NF4_NOTE = (
    "The adapter was trained and evaluated on the base in 4-bit NF4: on a base served in another precision "
    "(16-bit, AWQ, FP8) it answers slightly differently from what was evaluated, so re-evaluate what you serve "
    "(the merged export on the dequantized base holds the evaluated weights)."
)
