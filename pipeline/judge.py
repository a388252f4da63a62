"""The pairwise judge: an LLM compares two systems' answers to the same eval row, in both orders.

LLM judges prefer the answer in the first position (Zheng et al. 2023, "Judging LLM-as-a-judge"), so every
example is judged twice: once with system a as answer A, once with it as answer B. A winner counts only when
both orders agree; a disagreement is a tie and is counted as ``inconsistent``. The judge sees the task input,
the reference answer when the row has one, and the two answers, and must reply with one JSON object
``{"winner": "A" | "B" | "tie", "reason": "..."}`` (structured output: ``response_format`` with a JSON schema
on OpenAI-compatible servers, ``output_config`` on Anthropic). A reply that is not that object is retried
like a 5xx, then counted as failed: a verdict is never guessed from prose.

Egress is the baseline's, through its machinery (``pipeline.baseline``): nothing is sent while
``judge.send_data`` is false; the host must be loopback or on ``privacy.allowed_hosts``; every row sent is
recorded by SHA-256 in ``eval/judge_sent.jsonl``; the key comes from the environment and is scrubbed from every
error kept. The eval rows were put through the data contract (and its PII policy) before they reach any
system; the systems' answers are scanned here with the contract's detector and its strictest field policy
(block: the example is not sent, counted failed; redact: placeholders before sending; warn: sent, counted),
and the same redaction is applied to answers and reasons written to ``eval/judge.jsonl`` and the report.
Judgements are cached by request hash like baseline answers: a re-run sends nothing already judged, an
interrupted run resumes, and retries and backoff work within ``max_retries`` and ``retry_budget``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import baseline, rundir
from pipeline.recipe import JudgeSection
from pipeline.tasks import Task

JUDGE_LOG = "judge.jsonl"
JUDGE_SENT_LOG = "judge_sent.jsonl"
WINNERS = ("A", "B", "tie")
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": list(WINNERS)}, "reason": {"type": "string"}},
    "required": ["winner", "reason"],
    "additionalProperties": False,
}
INSTRUCTIONS = (
    "You are an impartial judge. Two assistants, A and B, answered the same task. Decide which answer is "
    "better: more correct, more complete and more faithful to the task input{reference}. Do not prefer an answer "
    "for its position or its length. Reply with exactly one JSON object and nothing else: "
    '{{"winner": "A" | "B" | "tie", "reason": "<one or two sentences>"}}.'
)
SCORE = {"win": 1.0, "tie": 0.5, "inconsistent": 0.5, "loss": 0.0}


@dataclass
class JudgeResult:
    """What the judge produced: the ``judge`` block of metrics.json and one record per (pair, example)."""

    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def judge_pairs(settings: JudgeSection, systems: list[str]) -> list[tuple[str, str]]:
    """The pairs to judge among the systems with answers: ``judge.pairs``, else finetuned vs baseline or base."""
    if settings.pairs is not None:
        pairs = [tuple(p.strip() for p in pair.split(" vs ", 1)) for pair in settings.pairs]
    else:
        pairs = [("finetuned", "baseline" if "baseline" in systems else "base")]
    return [(a, b) for a, b in pairs if a in systems and b in systems]


def parse_verdict(text: str) -> dict[str, str]:
    """The judge's reply as ``{"winner", "reason"}``.

    Raises:
        baseline.MalformedAnswer: The reply is not one JSON object with a winner among A, B, tie.
    """
    from pipeline.freeform import parse_json

    parsed, value = parse_json(text)
    if not parsed or not isinstance(value, dict):
        raise baseline.MalformedAnswer(f"the judge replied without one JSON object: {text.strip()[:80]!r}")
    winner = value.get("winner")
    if winner not in WINNERS:
        raise baseline.MalformedAnswer(f"the judge's winner is {winner!r}, not one of A, B, tie")
    return {"winner": str(winner), "reason": str(value.get("reason", ""))}


def judge_messages(
    task: Task, row: dict[str, Any], answer_a: str, answer_b: str, rubric: str | None, with_reference: bool = True
) -> list[dict[str, str]]:
    """The judge's prompt: instructions (with the rubric), then the task input, the reference and both answers."""
    system = INSTRUCTIONS.format(reference=" and to the reference answer" if with_reference else "")
    if rubric:
        system += f"\n\nRubric for this task:\n{rubric.strip()}"
    prompt = task.chat_messages(row)
    parts = ["# Task input", *(_message_text(m) for m in prompt)]
    if task.tools is not None and task.tools(row):
        parts.insert(1, "[tools]\n" + json.dumps(task.tools(row), ensure_ascii=False))
    if with_reference:
        parts += ["# Reference answer", task.target(row)]
    parts += ["# Answer A", answer_a, "# Answer B", answer_b]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _message_text(message: dict[str, Any]) -> str:
    """One message of the task input for the judge: role, text, and tool calls (a chat conversation has them)."""
    text = f"[{message['role']}]\n{message.get('content') or ''}"
    calls = message.get("tool_calls")
    if calls:
        text += "\ntool calls: " + json.dumps([c.get("function", c) for c in calls], ensure_ascii=False)
    return text


def structured_output(provider: str) -> dict[str, Any]:
    """The SDK keyword that asks for the verdict's JSON schema (vLLM and OpenAI; Anthropic's output_config)."""
    if provider == "openai":
        schema = {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {"output_config": {"format": {"type": "json_schema", "schema": VERDICT_SCHEMA}}}


class _PiiPolicy:
    """The contract's strictest field policy applied to free text bound for the judge or its outputs."""

    ORDER = ("warn", "redact", "block")

    def __init__(self, contract: Any):
        policies = [rule.pii for rule in getattr(contract, "fields", {}).values() if getattr(rule, "pii", None)]
        conversation = getattr(contract, "conversation", None)
        if conversation is not None and conversation.pii:
            policies.append(conversation.pii)  # a chat contract's policy over every message
        self.policy = max(policies, key=self.ORDER.index) if policies else None
        self.scanner = None
        if self.policy is not None:
            from pipeline.pii import pii_scanner

            self.scanner = pii_scanner(tuple(contract.pii.entities), contract.pii.min_score)

    def findings(self, text: str) -> list[Any]:
        return self.scanner.scan(text) if self.scanner is not None and text else []

    def scrub(self, text: str) -> str:
        """Text for outputs: redacted under a block or redact policy, as it is under warn or none."""
        from pipeline.pii import redact

        if self.policy in ("block", "redact"):
            found = self.findings(text)
            return redact(text, found) if found else text
        return text


def run_judge(
    settings: JudgeSection,
    task: Task,
    rows: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]]],
    *,
    allowed_hosts: list[str] | tuple[str, ...],
    contract: Any,
    cache_dir: str | Path,
    eval_dir: str | Path,
    samples: int = 1000,
    seed: int = 42,
) -> JudgeResult:
    """Judge each pair of systems on every eval row, both orders; write ``eval/judge.jsonl``.

    Args:
        settings: The recipe's judge section.
        task: The task (its prompt is the judge's task input, its target the reference).
        rows: The validated eval rows, in the order of every system's answers.
        outputs: System -> answers (``text``, and ``error`` for a failed one), as evaluation scored them.
        allowed_hosts: The recipe's privacy.allowed_hosts.
        contract: The data contract (its PII detector and policies), or None.
        cache_dir: Directory of cached judgements.
        eval_dir: The run's eval/ directory.
        samples: Bootstrap resamples for the win rate's interval.
        seed: Resampling seed.
    """
    host = urlparse(baseline.base_url(settings)).hostname
    summary: dict[str, Any] = {
        "provider": settings.provider,
        "model": settings.model,
        "host": host,
        "send_data": settings.send_data,
        "api_key_env": baseline.key_env(settings),
    }
    pairs = judge_pairs(settings, list(outputs))

    def skipped(reason: str) -> JudgeResult:
        print(f"Judge {settings.provider}/{settings.model} skipped: {reason}", flush=True)
        return JudgeResult({**summary, "status": "skipped", "reason": reason, "rows_sent": 0, "requests_sent": 0})

    if not pairs:
        return skipped(f"no pair of systems with answers to judge (systems scored: {', '.join(outputs) or 'none'})")
    if not settings.send_data:
        return skipped(
            "judge.send_data is false, so nothing was sent to the judge (set judge.send_data: true to judge; it "
            "receives eval inputs, references and the systems' answers, after the data contract and its PII policy)"
        )
    allowed, reason = baseline.egress_decision(settings, allowed_hosts, "judge")
    if not allowed:
        return skipped(reason)
    policy = _PiiPolicy(contract)
    examples, jobs, job_rows, answers = _plan(settings, task, rows, outputs, pairs, policy, Path(cache_dir))
    api_key = ""
    if jobs:
        refusal, api_key = baseline.request_refusal(settings, "judge", Path(cache_dir), Path(eval_dir) / JUDGE_SENT_LOG)
        if refusal:
            return skipped(refusal)
    caller = baseline.Caller(
        settings, api_key, Path(cache_dir), extra=structured_output(settings.provider), check=parse_verdict
    )
    log = baseline.SentLog(Path(eval_dir) / JUDGE_SENT_LOG, [])
    print(
        f"Judge {settings.provider}/{settings.model} at {host}: {len(answers) - len(jobs)} judgements cached, "
        f"{len(jobs)} to request ({settings.max_concurrency} at a time)",
        flush=True,
    )
    started = time.perf_counter()
    if jobs:
        baseline.ask_all(caller, log, job_rows, jobs, answers, settings.max_concurrency, started, label="judge")
    records = [_record(example, answers, policy) for example in examples]
    rundir.write_jsonl(Path(eval_dir) / JUDGE_LOG, records)
    judged = [a for a in answers if a is not None]
    tokens_in, tokens_out = sum(a["tokens_in"] for a in judged), sum(a["tokens_out"] for a in judged)
    cost = None
    if settings.price_input_per_1m is not None and settings.price_output_per_1m is not None:
        cost = tokens_in * settings.price_input_per_1m / 1e6 + tokens_out * settings.price_output_per_1m / 1e6
    per_pair = [_pair_summary(a, b, records, samples, seed) for a, b in pairs]
    summary.update(
        {
            "status": "ok",
            "reason": "",
            **per_pair[0],
            "pairs": per_pair,
            "requests_sent": caller.requests,
            "judgements_from_cache": sum(bool(a.get("cached")) for a in judged),
            "retries": caller.retries,
            "retry_budget_left": caller.budget_left,
            # Distinct eval rows that went out in this run (each request is logged; two per example).
            "rows_sent": len({baseline.row_hash(job_rows[index]) for index, _, _ in jobs}) if log.eval_rows else 0,
            "requests_logged": log.eval_rows,
            "rows_sent_all_runs": log.distinct_rows(),
            "sent_log": f"eval/{JUDGE_SENT_LOG}",
            "pii_policy": policy.policy,
            "pii_warned": sum(bool(e.get("pii_warned")) for e in examples),
            "tokens_in": float(tokens_in),
            "tokens_out": float(tokens_out),
            "cost_usd": cost,
            "wall_seconds": round(time.perf_counter() - started, 3),
        }
    )
    print(judge_sentence(summary), flush=True)
    return JudgeResult(summary, records)


def _plan(
    settings: JudgeSection,
    task: Task,
    rows: list[dict[str, Any]],
    outputs: dict[str, list[dict[str, Any]]],
    pairs: list[tuple[str, str]],
    policy: _PiiPolicy,
    cache_dir: Path,
) -> tuple[list[dict[str, Any]], list[tuple[int, str, list[dict[str, str]]]], list[dict[str, Any]], list[Any]]:
    """(examples, uncached jobs, the row of each request, answers per request with cached ones filled in).

    Each example asks two requests (orders AB and BA), numbered ``2 k`` and ``2 k + 1``; an example that
    cannot be judged (an empty or failed answer, PII under a block policy) asks none and keeps its error.
    """
    params = baseline.request_params(settings)
    examples: list[dict[str, Any]] = []
    jobs: list[tuple[int, str, list[dict[str, str]]]] = []
    job_rows: list[dict[str, Any]] = []
    answers: list[Any] = []
    for a, b in pairs:
        for index, row in enumerate(rows):
            out_a, out_b = outputs[a][index], outputs[b][index]
            example: dict[str, Any] = {"pair": (a, b), "row": row, "texts": (out_a["text"], out_b["text"])}
            examples.append(example)
            error = _unjudgeable(a, out_a) or _unjudgeable(b, out_b)
            texts = [out_a["text"], out_b["text"]]
            if error is None and policy.policy is not None:
                found = {f.entity for t in texts for f in policy.findings(t)}
                if found and policy.policy == "block":
                    error = (
                        f"pii_blocked: an answer holds {', '.join(sorted(found))} and the contract's pii policy is "
                        "block, so the example was not sent to the judge"
                    )
                elif found and policy.policy == "redact":
                    texts = [policy.scrub(t) for t in texts]
                example["pii_warned"] = bool(found) and policy.policy == "warn"
            if error is not None:
                example["error"] = error
                continue
            example["requests"] = []
            for first, second in ((0, 1), (1, 0)):
                messages = judge_messages(task, row, texts[first], texts[second], settings.rubric)
                key = baseline.request_key(settings.provider, settings.model, messages, params)
                example["requests"].append(len(answers))
                job_rows.append(row)
                cached = baseline.cached_answer(cache_dir, key)
                answers.append(cached)
                if cached is None:
                    jobs.append((len(answers) - 1, key, messages))
    return examples, jobs, job_rows, answers


def _unjudgeable(system: str, out: dict[str, Any]) -> str | None:
    if "error" in out:
        return f"no_answer: the {system} answer failed ({out['error'].split(':', 1)[0]}), so there is nothing to judge"
    if not out["text"].strip():
        return f"empty_answer: the {system} answer is empty, so there is nothing to judge"
    return None


def _record(example: dict[str, Any], answers: list[Any], policy: _PiiPolicy) -> dict[str, Any]:
    """One line of judge.jsonl: both verdicts and reasons, the outcome, and the texts (PII policy applied)."""
    (a, b), row = example["pair"], example["row"]
    record: dict[str, Any] = {
        "pair": f"{a} vs {b}",
        "a": a,
        "b": b,
        "id": row.get("id"),
        "row": row.get("_row"),
        "answer_a": policy.scrub(example["texts"][0]),
        "answer_b": policy.scrub(example["texts"][1]),
    }
    if "error" in example:
        return {**record, "outcome": "failed", "error": example["error"], "verdicts": []}
    verdicts, winners, errors = [], [], []
    for order, number in zip(("AB", "BA"), example["requests"], strict=True):
        answer = answers[number]
        if answer is None or "error" in answer:
            # e.g. "judge_malformed: MalformedAnswer: the judge replied without one JSON object ... (order BA)"
            errors.append(f"judge_{answer['error'] if answer else 'not_sent: interrupted'} (order {order})")
            continue
        verdict = parse_verdict(answer["text"])  # cached or checked on arrival: parses
        shown = {"A": a, "B": b} if order == "AB" else {"A": b, "B": a}
        winner = shown.get(verdict["winner"], "tie")
        winners.append(winner)
        verdicts.append(
            {"order": order, "A": shown["A"], "B": shown["B"], "winner": verdict["winner"], "winner_system": winner}
            | {"reason": policy.scrub(verdict["reason"]), "cached": bool(answer.get("cached"))}
        )
    record["verdicts"] = verdicts
    if errors:
        return {**record, "outcome": "failed", "error": "; ".join(errors)}
    if winners[0] != winners[1]:
        outcome = "inconsistent"
    else:
        outcome = "win" if winners[0] == a else "loss" if winners[0] == b else "tie"
    return {**record, "outcome": outcome}


def _pair_summary(a: str, b: str, records: list[dict[str, Any]], samples: int, seed: int) -> dict[str, Any]:
    """Counts, win rate of ``a`` ((wins + ties / 2) / judged), its bootstrap interval over examples, verdict."""
    import numpy as np

    mine = [r for r in records if r["a"] == a and r["b"] == b]
    count = {k: sum(r["outcome"] == k for r in mine) for k in ("win", "loss", "tie", "inconsistent", "failed")}
    scores = np.array([SCORE[r["outcome"]] for r in mine if r["outcome"] != "failed"], dtype=float)
    failures: dict[str, int] = {}
    for r in mine:
        if r["outcome"] == "failed":
            kind = r["error"].split(":", 1)[0]
            failures[kind] = failures.get(kind, 0) + 1
    out: dict[str, Any] = {
        "a": a,
        "b": b,
        "wins": count["win"],
        # A disagreement between the two orders is a tie, and counted as inconsistent too.
        "ties": count["tie"] + count["inconsistent"],
        "losses": count["loss"],
        "inconsistent": count["inconsistent"],
        "failed": count["failed"],
        "failures_by_kind": failures,
        "judged": int(scores.size),
        "win_rate": None,
        "ci95": None,
        "verdict": "not judged",
        "samples": samples,
    }
    if scores.size:
        rng = np.random.default_rng(seed)
        means = []
        for start in range(0, samples, 200):
            idx = rng.integers(0, scores.size, size=(min(200, samples - start), scores.size))
            means += list(scores[idx].mean(axis=1))
        low, high = float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
        out.update(
            win_rate=float(scores.mean()),
            ci95=[low, high],
            verdict="better" if low > 0.5 else "worse" if high < 0.5 else "no significant difference",
        )
    return out


# --------------------------------------------------------------------------------------------------
# Report, terminal and MLflow


def judge_sentence(summary: dict[str, Any]) -> str:
    """The judge's result in words, one line per pair (or why it was skipped)."""
    if summary.get("status") != "ok":
        return f"Judge ({summary['provider']}/{summary['model']}) skipped: {summary['reason']}"
    lines = []
    for p in summary["pairs"]:
        head = (
            f"Judge {summary['model']}: {p['a']} vs {p['b']}: {p['wins']} wins, {p['losses']} losses, {p['ties']} "
            f"ties ({p['inconsistent']} inconsistent between the two orders), {p['failed']} failed"
        )
        if p["failures_by_kind"]:
            head += " (" + ", ".join(f"{k} {v}" for k, v in sorted(p["failures_by_kind"].items())) + ")"
        if p["win_rate"] is None:
            lines.append(f"{head}; nothing judged")
        else:
            low, high = p["ci95"]
            lines.append(
                f"{head}; win rate {p['win_rate']:.3f} (95% CI {low:.3f} to {high:.3f}, bootstrap over "
                f"{p['judged']} examples): {p['verdict']}"
            )
    return "\n".join(lines)


def report_lines(result: JudgeResult, task: Task, rows: list[dict[str, Any]], limit: int = 10) -> list[str]:
    """The report's judge section and the side-by-side examples where the fine-tune loses (PII policy applied)."""
    s = result.summary
    lines = ["## Pairwise judge", ""]
    if s.get("status") != "ok":
        return [*lines, judge_sentence(s) + ".", ""]
    lines += [
        "| pair | wins | losses | ties | inconsistent | failed | win rate | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in s["pairs"]:
        rate = f"{p['win_rate']:.3f}" if p["win_rate"] is not None else "n/a"
        ci = f"{p['ci95'][0]:.3f} to {p['ci95'][1]:.3f}" if p["ci95"] else "n/a"
        lines.append(
            f"| {p['a']} vs {p['b']} | {p['wins']} | {p['losses']} | {p['ties']} | {p['inconsistent']} | "
            f"{p['failed']} | {rate} | {ci} | {p['verdict']} |"
        )
    cost = f"${s['cost_usd']:.4f}" if s.get("cost_usd") is not None else "unknown (no judge prices)"
    lines += [
        "",
        f"Judge `{s['model']}` ({s['provider']}) at host `{s['host']}`, each example judged in both orders; a winner "
        "counts only when both agree. Requests "
        f"{s['requests_sent']}, judgements from the cache {s['judgements_from_cache']}, retries {s['retries']}; "
        f"tokens {s['tokens_in']:,.0f} in, {s['tokens_out']:,.0f} out; cost {cost}. Rows sent: {s['rows_sent']} "
        f"(SHA-256 of each in `{s['sent_log']}`); verdicts and reasons in `eval/{JUDGE_LOG}`.",
        "",
    ]
    by_row = {r.get("_row"): r for r in rows}
    losses = [
        r
        for r in result.records
        if (r["a"] == "finetuned" and r["outcome"] == "loss") or (r["b"] == "finetuned" and r["outcome"] == "win")
    ]
    if losses:
        lines += [f"## Where the fine-tune loses ({len(losses)}; the first {min(limit, len(losses))})", ""]
    for r in losses[:limit]:
        # The answers and reasons in a record are scrubbed already; the input and the reference come from the
        # eval row, which the data contract redacted before any system saw it.
        row = by_row.get(r["row"], {})
        prompt = task.user_prompt(row) if row else ""
        lines += [
            f"### {r['pair']}, row {r['row']} (id {r['id']})",
            "",
            f"**Input:** {_clip(prompt)}",
            "",
            f"**Reference:** {_clip(task.target(row)) if row else ''}",
            "",
            "| " + r["a"] + " | " + r["b"] + " |",
            "|---|---|",
            f"| {_cell(r['answer_a'])} | {_cell(r['answer_b'])} |",
            "",
            *[
                f"- Judge ({v['order']}: A = {v['A']}, B = {v['B']}) chose {v['winner']}: {_clip(v['reason'])}"
                for v in r["verdicts"]
            ],
            "",
        ]
    return lines


def _clip(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cell(text: str) -> str:
    return _clip(text).replace("|", "\\|")


def log_judge(tracker: Any, result: JudgeResult) -> None:
    """MLflow: ``eval.judge.*`` (the first pair; ``eval.judge.<a>_vs_<b>.*`` for the others) and a table."""
    s = result.summary
    if s.get("status") != "ok":
        tracker.set_tags({"eval.judge.status": "skipped"})
        return
    metrics: dict[str, float] = {
        "eval.judge.requests": float(s["requests_sent"]),
        "eval.judge.judgements_from_cache": float(s["judgements_from_cache"]),
    }
    if s.get("cost_usd") is not None:
        metrics["eval.judge.cost_usd"] = float(s["cost_usd"])
    for number, p in enumerate(s["pairs"]):
        prefix = "eval.judge" if number == 0 else f"eval.judge.{p['a']}_vs_{p['b']}"
        for key in ("wins", "losses", "ties", "inconsistent", "failed", "judged"):
            metrics[f"{prefix}.{key}"] = float(p[key])
        if p["win_rate"] is not None:
            metrics |= {
                f"{prefix}.win_rate": p["win_rate"],
                f"{prefix}.ci95_low": p["ci95"][0],
                f"{prefix}.ci95_high": p["ci95"][1],
            }
    tracker.log_metrics(metrics)
    tracker.set_tags({"eval.judge.verdict": s["verdict"], "eval.judge.model": s["model"]})
    records = result.records
    reasons = [[v["reason"] for v in r["verdicts"]] + ["", ""] for r in records]
    tracker.log_table(
        {
            "pair": [r["pair"] for r in records],
            "id": [r["id"] for r in records],
            "row": [r["row"] for r in records],
            "outcome": [r["outcome"] for r in records],
            "reason_ab": [x[0] for x in reasons],
            "reason_ba": [x[1] for x in reasons],
            "error": [r.get("error", "") for r in records],
        },
        "eval/judge_table.json",
    )
