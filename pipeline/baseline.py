"""The commercial baseline: the same eval rows, the same task prompt, a remote model through its official SDK.

Egress is explicit. With ``baseline.send_data: false`` (the default) nothing is sent and the result says the
baseline was skipped and why. With ``true`` the endpoint's host must be loopback or on
``privacy.allowed_hosts``, and only the rows handed in (``ValidatedData.eval.rows``, already through the
contract and its PII policy) plus ``few_shot`` train rows are sent; each sent row is recorded by hash in
``eval/baseline_sent.jsonl``.

Every answer is cached on disk as soon as it arrives, keyed by a hash of provider, model, messages and
parameters: a re-run sends nothing already answered, and an interrupted run resumes where it stopped.
The SDKs' own retries are off (``max_retries=0``) so that every attempt is counted here: 429s, 5xx,
timeouts, dropped connections and malformed answers are retried with exponential backoff (and the
server's Retry-After) within ``max_retries`` per example and ``retry_budget`` per run. What still fails
is recorded per example, never dropped, and never stops the evaluation.

The API key is read from the environment variable named by ``api_key_env``, handed to the SDK client, and
scrubbed from every error text kept; it is never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import rundir, snapshot
from pipeline.egress import EgressGuard, redact_secrets
from pipeline.errors import JobFailed
from pipeline.recipe import BaselineSection, RemoteModelSection
from pipeline.tasks import Task

DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# Request timeout (408), conflict (409, the APIs' lock contention) and rate limits (429) are worth
# retrying, as is any 5xx (529 is Anthropic's "overloaded"); every other 4xx would fail the same way again.
RETRY_STATUS = {408, 409, 429}
STOP_STATUS = {401, 403}  # the key is wrong or lacks access: stop sending for the whole run
SENT_LOG = "baseline_sent.jsonl"


class MalformedAnswer(JobFailed):
    """The provider answered 2xx but without a usable text answer (no choice, no text block)."""


@dataclass
class BaselineResult:
    """What the baseline run produced.

    Attributes:
        status: ``ok`` (requests were made or answered from the cache), ``skipped`` (nothing was sent) or
            ``not_cached`` (``cache_only`` and some answer is not in the cache: not reported).
        reason: Why it was skipped, in words; empty when ok.
        outputs: Per eval row, in order: ``text``, ``stopped``, ``tokens_in``, ``tokens_out``, ``latency_s``,
            ``attempts``, ``cached`` and, for a failed example, ``error``. None when skipped.
        summary: The ``baseline`` block of eval/metrics.json (counts, host, what was sent).
    """

    status: str
    reason: str
    outputs: list[dict[str, Any]] | None
    summary: dict[str, Any] = field(default_factory=dict)


def base_url(settings: RemoteModelSection) -> str:
    """The endpoint used: the recipe's, else the provider's public API."""
    return settings.base_url or DEFAULT_BASE_URL[settings.provider]


def key_env(settings: RemoteModelSection) -> str:
    """Name of the environment variable holding the key."""
    return settings.api_key_env or DEFAULT_KEY_ENV[settings.provider]


def egress_decision(
    settings: RemoteModelSection, allowed_hosts: list[str] | tuple[str, ...], section: str = "baseline"
) -> tuple[bool, str]:
    """(allowed, reason) for the endpoint's host under the recipe's privacy.allowed_hosts."""
    host = urlparse(base_url(settings)).hostname or ""
    if not host:
        return False, f"{section}.base_url {base_url(settings)!r} names no host"
    allowed, reason = EgressGuard(tuple(allowed_hosts)).decide(host)
    if allowed:
        return True, reason
    return False, (
        f"the endpoint host {host} is not loopback and not on privacy.allowed_hosts; add {host!r} there to allow "
        "sending eval rows to it"
    )


def request_refusal(
    settings: RemoteModelSection, section: str, cache_dir: Path, sent_log: Path
) -> tuple[str | None, str]:
    """(why nothing may be requested, or None; the API key) once some request is needed.

    The key must be set, and the cache and the sent-rows log writable (checked before the first request).
    """
    api_key = os.environ.get(key_env(settings), "")
    if not api_key:
        return f"the environment variable {key_env(settings)} ({section}.api_key_env) is not set or empty", ""
    return _unwritable(cache_dir, sent_log, section), api_key


def build_messages(task: Task, row: dict[str, Any], shots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fine-tune's own chat prompt, with ``shots`` solved train rows as earlier user/assistant turns.

    A conversation (task chat) is sent as it is, up to the answer: its own earlier turns are its examples.
    """
    if task.conversation is not None:
        return task.chat_messages(row)
    system, user = task.chat_messages(row)
    messages = [system]
    for shot in shots:
        messages += [
            {"role": "user", "content": task.user_prompt(shot)},
            {"role": "assistant", "content": task.target(shot)},
        ]
    return [*messages, user]


def few_shot_rows(train_rows: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """``k`` train rows drawn with the recipe's seed (the same shots for every eval row and every re-run)."""
    if k <= 0 or not train_rows:
        return []
    return random.Random(seed).sample(train_rows, min(k, len(train_rows)))


def request_params(settings: BaselineSection) -> dict[str, Any]:
    """Generation parameters sent with every request (part of the cache key); temperature 0 unless told otherwise."""
    params: dict[str, Any] = {"max_tokens": settings.max_tokens}
    if settings.temperature is not None:
        params["temperature"] = settings.temperature
    return params


def request_key(provider: str, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """SHA-256 over provider, model, messages and parameters: the cache key of one request."""
    body = json.dumps(
        {"provider": provider, "model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 of a row as it was sent (its fields, without the pipeline's line number)."""
    body = json.dumps({k: v for k, v in row.items() if k != "_row"}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def run_baseline(
    settings: BaselineSection,
    task: Task,
    rows: list[dict[str, Any]],
    *,
    train_rows: list[dict[str, Any]],
    allowed_hosts: list[str] | tuple[str, ...],
    cache_dir: str | Path,
    eval_dir: str | Path,
    seed: int = 42,
    cache_only: bool = False,
) -> BaselineResult:
    """Answer every eval row with the baseline model (or say why nothing was sent).

    With ``cache_only`` nothing is sent at all: the answers are taken from the cache when every row has one
    (status ``ok``, ``requests_sent`` 0), else the result has status ``not_cached``. This is how re-scoring
    another system keeps a baseline scored earlier. ``send_data: false`` still means skipped.

    Args:
        settings: The recipe's baseline section.
        task: The recipe's task (prompt and parser shared with the fine-tune).
        rows: The validated eval rows to send; nothing else of the eval split is ever read.
        train_rows: Validated train rows, the pool of few-shot examples.
        allowed_hosts: The recipe's privacy.allowed_hosts.
        cache_dir: Directory of cached answers (one JSON file per request hash).
        eval_dir: The run's eval/ directory, for the log of sent rows.
        seed: Seed for drawing few-shot rows.
        cache_only: Send nothing; report the baseline only if every answer is cached.

    Returns:
        The outputs per row and the summary for metrics.json.
    """
    summary: dict[str, Any] = {
        "provider": settings.provider,
        "model": settings.model,
        "host": urlparse(base_url(settings)).hostname,
        "send_data": settings.send_data,
        "api_key_env": key_env(settings),
    }

    def skipped(reason: str) -> BaselineResult:
        print(f"Baseline {settings.provider}/{settings.model} skipped: {reason}", flush=True)
        return BaselineResult(
            "skipped", reason, None, {**summary, "status": "skipped", "reason": reason, "rows_sent": 0}
        )

    shots = few_shot_rows(train_rows, settings.few_shot, seed)
    if settings.snapshot is not None:
        return _from_snapshot(settings, task, rows, shots, summary, skipped)
    if not settings.send_data:
        return skipped(
            "baseline.send_data is false, so no eval row was sent to the provider (set baseline.send_data: true "
            "to compare against it; rows are sent only after the data contract and its PII policy)"
        )
    allowed, reason = egress_decision(settings, allowed_hosts)
    if not allowed and not cache_only:  # reading the cache sends nothing
        return skipped(reason)
    params = request_params(settings)
    jobs = []
    outputs: list[dict[str, Any] | None] = [None] * len(rows)
    tools: dict[str, list[dict[str, Any]]] = {}
    for index, row in enumerate(rows):
        messages = build_messages(task, row, shots)
        row_tools = task.tools(row) if task.tools is not None else None
        key = request_key(
            settings.provider, settings.model, messages, {**params, "tools": row_tools} if row_tools else params
        )
        if row_tools:
            tools[key] = row_tools
        cached = cached_answer(Path(cache_dir), key)
        if cached is not None:
            outputs[index] = cached
        else:
            jobs.append((index, key, messages))
    if cache_only and jobs:
        reason = f"{len(rows) - len(jobs)} of {len(rows)} answers cached; not re-scored without new requests"
        return BaselineResult("not_cached", reason, None, {**summary, "status": "not_cached", "reason": reason})
    api_key = ""
    if jobs:  # a fully cached re-run needs no key
        refusal, api_key = request_refusal(settings, "baseline", Path(cache_dir), Path(eval_dir) / SENT_LOG)
        if refusal:
            return skipped(refusal)
    log = SentLog(Path(eval_dir) / SENT_LOG, shots)
    caller = Caller(settings, api_key, Path(cache_dir), tools=tools)
    print(
        f"Baseline {settings.provider}/{settings.model} at {summary['host']}: {len(rows) - len(jobs)} answers "
        f"cached, {len(jobs)} to request ({settings.max_concurrency} at a time)",
        flush=True,
    )
    started = time.perf_counter()
    if jobs:
        ask_all(caller, log, rows, jobs, outputs, settings.max_concurrency, started)
    final = [o for o in outputs if o is not None]
    summary.update(_keep_snapshot(settings, task, rows, shots, final, Path(eval_dir).parent / snapshot.SNAPSHOT_FILE))
    failures: dict[str, int] = {}
    for out in final:
        if "error" in out:
            kind = out["error"].split(":", 1)[0]
            failures[kind] = failures.get(kind, 0) + 1
    summary.update(
        {
            "status": "ok",
            "reason": "",
            "rows_sent": log.eval_rows,
            "few_shot_rows_sent": log.train_rows,
            "rows_sent_all_runs": log.distinct_rows(),
            "sent_log": f"eval/{SENT_LOG}",
            "requests_sent": caller.requests,
            "answers_from_cache": sum(bool(o.get("cached")) for o in final),
            "answered": sum("error" not in o for o in final),
            "failed": sum("error" in o for o in final),
            "failures_by_kind": failures,
            "retries": caller.retries,
            "retry_budget_left": caller.budget_left,
            "cache_write_failures": caller.cache_failures,
            "few_shot": len(shots),
            "wall_seconds": round(time.perf_counter() - started, 3),
        }
    )
    return BaselineResult("ok", "", final, summary)


def ask_all(
    caller: Caller,
    log: SentLog,
    rows: list[dict[str, Any]],
    jobs: list[tuple[int, str, list[dict[str, str]]]],
    outputs: list[dict[str, Any] | None],
    max_concurrency: int,
    started: float,
    label: str = "baseline",
) -> None:
    """Ask the uncached ``jobs`` (row index, request key, messages) on worker threads; answers go into ``outputs``.

    ``rows[index]`` is the row a job sends (recorded in the sent log before its first attempt).
    """
    pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=label)
    try:
        futures = {
            pool.submit(caller.ask, key, messages, lambda i=index, k=key: log.eval_row(rows[i], k)): index
            for index, key, messages in jobs
        }
        done = 0
        for future in as_completed(futures):
            outputs[futures[future]] = future.result()
            done += 1
            if done == len(jobs) or done % max(1, len(jobs) // 10) == 0:
                print(
                    f"  {label} answered {done}/{len(jobs)} ({caller.failed} failed, {caller.retries} retries, "
                    f"{time.perf_counter() - started:.1f}s)",
                    flush=True,
                )
    finally:
        # On Ctrl-C, drop the queued requests instead of sending them; answers already in are cached.
        pool.shutdown(wait=False, cancel_futures=True)


class SentLog:
    """``eval/baseline_sent.jsonl``: one line per row, written before its first request leaves.

    Lines are appended and flushed one by one, so a row sent before an interruption is on record too. The
    few-shot train rows are recorded once, before the first request of the run that carries them.
    """

    def __init__(self, path: Path, shots: list[dict[str, Any]]):
        self.path, self.shots = path, shots
        self.eval_rows = self.train_rows = 0
        self._lock = threading.Lock()

    def eval_row(self, row: dict[str, Any], request_key: str) -> None:
        """Record an eval row about to be sent (called by the worker before its first attempt)."""
        with self._lock:
            if self.eval_rows == 0:
                self._write([("train", shot, None) for shot in self.shots])
                self.train_rows = len(self.shots)
            self._write([("eval", row, request_key)])
            self.eval_rows += 1

    def _write(self, entries: list[tuple[str, dict[str, Any], str | None]]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for split, row, key in entries:
                record = {"split": split, "id": row.get("id"), "row": row.get("_row"), "row_sha256": row_hash(row)}
                handle.write(json.dumps({**record, "request_sha256": key, "sent_at": stamp}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def distinct_rows(self) -> int:
        """Distinct rows (split, hash) sent to the baseline from this run directory, over every evaluation."""
        if not self.path.is_file():
            return 0
        lines = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return len({(e["split"], e["row_sha256"]) for e in lines})


def cached_answer(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The cached answer for a request hash, or None (an unreadable cache file counts as absent)."""
    path = cache_dir / f"{key}.json"
    if not path.is_file():
        return None
    try:
        answer = json.loads(path.read_text(encoding="utf-8"))["answer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**answer, "attempts": 0, "cached": True}


def _os_error(exc: OSError) -> str:
    """A file-system error in one line: the file and the reason (``/x/y.json: No space left on device``)."""
    return f"{exc.filename or '(unknown file)'}: {exc.strerror or type(exc).__name__}"


def _unwritable(cache_dir: Path, sent_log: Path, section: str = "baseline") -> str | None:
    """Why the cache or the sent-rows log cannot be written (checked before the first request), or None.

    Without the cache every answer would be paid for again on the next run; without the log, rows would leave
    unrecorded. Either way nothing is sent.
    """
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_text(cache_dir / ".write-check", "")
        (cache_dir / ".write-check").unlink()
    except OSError as exc:
        return (
            f"the answer cache {cache_dir} cannot be written ({_os_error(exc)}), so nothing was sent: make it "
            f"writable or set {section}.cache_dir"
        )
    try:
        sent_log.parent.mkdir(parents=True, exist_ok=True)
        with sent_log.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        return f"the sent-rows log {sent_log} cannot be written ({_os_error(exc)}), so nothing was sent"
    return None


class Caller:
    """One SDK client, the cache, and the retry/failure accounting shared by the worker threads."""

    def __init__(
        self,
        settings: RemoteModelSection,
        api_key: str,
        cache_dir: Path,
        *,
        extra: dict[str, Any] | None = None,
        check: Callable[[str], Any] | None = None,
        tools: dict[str, list[dict[str, Any]]] | None = None,
    ):
        """The caller of one section (baseline or judge).

        ``extra``: keyword arguments added to every SDK call (structured output); ``check(text)`` raises
        ``MalformedAnswer`` for an answer that must be retried (a judge's reply that is not its JSON);
        ``tools``: the tool definitions sent with a request, by its cache key (chat rows that define tools).
        """
        self.settings = settings
        self.tools = tools or {}
        self.extra = extra or {}
        self.check = check
        self._key = api_key
        self.cache_dir = cache_dir
        self.params = request_params(settings)
        self._lock = threading.Lock()
        self.requests = self.retries = self.failed = self.cache_failures = 0
        self.budget_left = settings.retry_budget
        self._stop_reason: str | None = None
        if settings.provider == "openai":
            import openai as sdk
        else:
            import anthropic as sdk
        self.sdk = sdk
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The SDK client, made on the first request (a fully cached re-run needs neither client nor key)."""
        with self._lock:
            if self._client is None:
                make = self.sdk.OpenAI if self.settings.provider == "openai" else self.sdk.Anthropic
                # max_retries=0: the SDK must not retry behind our back, every attempt is counted here.
                self._client = make(
                    api_key=self._key, base_url=base_url(self.settings), max_retries=0, timeout=self.settings.timeout_s
                )
            return self._client

    def ask(self, key: str, messages: list[dict[str, str]], before_first: Callable[[], None]) -> dict[str, Any]:
        """One example: attempts with backoff until an answer, a final failure, or the budget runs out.

        ``before_first`` runs once, just before the first request carrying the example leaves (the sent log).
        """
        attempts = 0
        while True:
            with self._lock:
                stop = self._stop_reason
            if stop is not None:
                return self._fail(f"not_sent: {stop}", attempts)
            if attempts == 0:
                try:
                    before_first()
                except OSError as exc:
                    # The row is not on record, so it must not leave; nor may any later one.
                    with self._lock:
                        self._stop_reason = f"the sent-rows log could not be written ({_os_error(exc)})"
                    continue
            attempts += 1
            with self._lock:
                self.requests += 1
            start = time.perf_counter()
            try:
                answer = self._call(messages, self.tools.get(key))
            except Exception as exc:  # noqa: BLE001 - classified below; nothing may stop the evaluation
                kind, retry, wait_hint = self._classify(exc)
                message = f"{kind}: {self._clean(exc)}"
                if kind == "auth":
                    with self._lock:
                        self._stop_reason = "the provider refused the API key earlier in this run"
                if not retry or attempts > self.settings.max_retries or not self._take_retry():
                    return self._fail(message, attempts)
                time.sleep(self._backoff(attempts, wait_hint))
                continue
            answer["latency_s"] = time.perf_counter() - start
            answer["answered_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if self.check is not None:
                try:
                    self.check(answer["text"])
                except MalformedAnswer as exc:
                    if attempts > self.settings.max_retries or not self._take_retry():
                        return self._fail(f"malformed: {self._clean(exc)}", attempts)
                    time.sleep(self._backoff(attempts, None))
                    continue
            try:
                rundir.write_json(
                    self.cache_dir / f"{key}.json",
                    {"key": key, "provider": self.settings.provider, "model": self.settings.model, "answer": answer},
                )
            except OSError as exc:
                # The answer is here and paid for: it is scored. Only a re-run would have to ask it again.
                with self._lock:
                    self.cache_failures += 1
                return {**answer, "attempts": attempts, "cached": False, "cache_error": _os_error(exc)}
            return {**answer, "attempts": attempts, "cached": False}

    def _call(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One request through the SDK; the text, whether it stopped on its own, and the token usage.

        An answer that calls tools is its calls as ``{"tool_calls": [{"name", "arguments"}]}`` JSON text, the
        form a chat reference is compared in (``chat.reference``).
        """
        settings = self.settings
        if settings.provider == "openai":
            sampling = {"temperature": self.params["temperature"]} if "temperature" in self.params else {}
            response = self.client.chat.completions.create(
                model=settings.model,
                messages=messages,
                max_completion_tokens=self.params["max_tokens"],
                **({"tools": tools} if tools else {}),
                **sampling,
                **self.extra,
            )
            try:
                choice = response.choices[0]
                text = choice.message.content
                finish = choice.finish_reason
                calls = getattr(choice.message, "tool_calls", None) or []
                if calls:
                    text = _tool_calls_text(calls)
                    finish = "stop" if finish == "tool_calls" else finish
            except (AttributeError, IndexError, TypeError) as exc:
                raise MalformedAnswer(f"no choice in the answer ({type(exc).__name__})") from None
            usage = getattr(response, "usage", None)
            tokens_in = getattr(usage, "prompt_tokens", None)
            tokens_out = getattr(usage, "completion_tokens", None)
            stopped = finish == "stop"
        else:
            # The SDK's create() takes no temperature keyword; the API still takes it in the body (older models).
            body = {"temperature": self.params["temperature"]} if "temperature" in self.params else None
            response = self.client.messages.create(
                model=settings.model,
                system=messages[0]["content"],
                messages=messages[1:],
                max_tokens=self.params["max_tokens"],
                extra_body=body,
                **self.extra,
            )
            try:
                blocks = [b.text for b in response.content if getattr(b, "type", None) == "text"]
            except (AttributeError, TypeError) as exc:
                raise MalformedAnswer(f"no content in the answer ({type(exc).__name__})") from None
            text = "".join(blocks) if blocks else None
            usage = getattr(response, "usage", None)
            tokens_in = getattr(usage, "input_tokens", None)
            tokens_out = getattr(usage, "output_tokens", None)
            stopped = getattr(response, "stop_reason", None) in ("end_turn", "stop_sequence")
        if not isinstance(text, str):
            raise MalformedAnswer("the answer holds no text")
        reported = getattr(response, "model", None)
        return {
            "text": text,
            "model_reported": reported if isinstance(reported, str) else None,
            "stopped": bool(stopped),
            "tokens_in": int(tokens_in or 0),
            "tokens_out": int(tokens_out or 0),
            "usage_reported": tokens_in is not None and tokens_out is not None,
        }

    def _classify(self, exc: Exception) -> tuple[str, bool, float | None]:
        """(kind, retry?, server's Retry-After in seconds) for an exception of either SDK."""
        sdk = self.sdk
        if isinstance(exc, sdk.APITimeoutError):
            return "timeout", True, None
        if isinstance(exc, sdk.APIConnectionError):
            return "connection", True, None
        if isinstance(exc, sdk.APIStatusError):
            status = exc.status_code
            wait = _retry_after(exc)
            if status == 429:
                return "rate_limited", True, wait
            if status >= 500:
                return "server_error", True, wait
            if status in STOP_STATUS:
                return "auth", False, None
            return f"http_{status}", status in RETRY_STATUS, wait
        if isinstance(exc, (MalformedAnswer, sdk.APIResponseValidationError, ValueError)):
            # A 2xx that is not the expected JSON (decoding/validation errors) or holds no answer.
            return "malformed", True, None
        return "error", False, None  # anything else is not the provider's doing: recorded, not retried

    def _take_retry(self) -> bool:
        with self._lock:
            if self.budget_left <= 0:
                return False
            self.budget_left -= 1
            self.retries += 1
            return True

    def _backoff(self, attempts: int, hint: float | None) -> float:
        """Exponential: initial x 2^(n-1), capped, with up to 25% jitter so parallel workers spread out."""
        s = self.settings
        wait = min(s.backoff_max_s, s.backoff_initial_s * 2 ** (attempts - 1))
        if hint is not None:
            wait = min(s.backoff_max_s, max(wait, hint))
        return wait * (1 + 0.25 * random.random())

    def _fail(self, message: str, attempts: int) -> dict[str, Any]:
        with self._lock:
            self.failed += 1
        return {
            "text": "",
            "stopped": False,
            "tokens_in": 0,
            "tokens_out": 0,
            "latency_s": None,
            "attempts": attempts,
            "cached": False,
            "error": message,
        }

    def _clean(self, exc: Exception) -> str:
        """The error text as kept in outputs: the key scrubbed, URL secrets redacted, one short line."""
        text = f"{type(exc).__name__}: {exc}"
        if self._key:
            text = text.replace(self._key, "***")
        return redact_secrets(" ".join(text.split()))[:300]


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _from_snapshot(
    settings: BaselineSection,
    task: Task,
    rows: list[dict[str, Any]],
    shots: list[dict[str, Any]],
    summary: dict[str, Any],
    skipped: Callable[[str], BaselineResult],
) -> BaselineResult:
    """The baseline scored from ``baseline.snapshot`` alone: nothing sent, no key; all rows or none."""
    path = Path(str(settings.snapshot))
    try:
        records, refused = snapshot.read_snapshot(path)
    except OSError as exc:
        return skipped(f"baseline.snapshot {path} cannot be read ({_os_error(exc)})")
    outputs, missing = [], 0
    for row in rows:
        record = records.get((settings.model, snapshot.prompt_sha256(build_messages(task, row, shots))))
        if record is None:
            missing += 1
        else:
            outputs.append({**snapshot.answer_of(record), "attempts": 0, "cached": True})
    refused_note = f"; {refused} lines refused (not JSON or not matching their record_sha256)" if refused else ""
    if missing:
        result = skipped(
            f"baseline.snapshot {path} has no answer of {settings.model} for {missing} of {len(rows)} eval rows "
            f"({missing} missing{refused_note}), so the baseline is not scored: a partial baseline is never scored "
            "as a whole; record the missing rows live (unset baseline.snapshot) or score the split it was made on"
        )
        result.summary.update({"source": "snapshot", "snapshot": str(path), "missing_rows": missing})
        return result
    reported = sorted({str(o["model_reported"]) for o in outputs if o.get("model_reported")})
    print(f"Baseline {settings.provider}/{settings.model}: {len(rows)} answers from the snapshot {path}, nothing sent")
    summary.update(
        {
            "status": "ok",
            "reason": "",
            "source": "snapshot",
            "snapshot": str(path),
            "snapshot_sha256": rundir.sha256_file(path),
            "snapshot_refused_lines": refused,
            "models_reported": reported,
            "missing_rows": 0,
            "rows_sent": 0,
            "few_shot_rows_sent": 0,
            "rows_sent_all_runs": 0,
            "sent_log": "(none: scored from the snapshot)",
            "requests_sent": 0,
            "answers_from_cache": len(outputs),
            "answered": len(outputs),
            "failed": 0,
            "failures_by_kind": {},
            "retries": 0,
            "retry_budget_left": settings.retry_budget,
            "cache_write_failures": 0,
            "few_shot": len(shots),
            "wall_seconds": 0.0,
        }
    )
    return BaselineResult("ok", "", outputs, summary)


def _keep_snapshot(
    settings: BaselineSection,
    task: Task,
    rows: list[dict[str, Any]],
    shots: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    path: Path,
) -> dict[str, Any]:
    """Add every answered row to the run's snapshot file; the summary's snapshot fields (a write error is kept)."""
    records = [
        snapshot.make_record(settings.provider, settings.model, build_messages(task, row, shots), out)
        for row, out in zip(rows, outputs, strict=True)
        if "error" not in out
    ]
    try:
        added = snapshot.append_records(path, records)
    except OSError as exc:
        return {"snapshot": str(path), "snapshot_error": _os_error(exc)}
    reported = sorted({str(o["model_reported"]) for o in outputs if o.get("model_reported")})
    return {"snapshot": str(path), "snapshot_added": added, "models_reported": reported}


def snapshot_input(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The baseline's snapshot file as an MLflow dataset input of the run, when the baseline was scored."""
    path = (summary or {}).get("snapshot")
    if summary is None or summary.get("status") != "ok" or not path or not Path(path).is_file():
        return None
    return snapshot.dataset_input(path, model=summary["model"])


def _tool_calls_text(calls: list[Any]) -> str:
    """An OpenAI answer's tool calls as ``{"tool_calls": [...]}`` JSON (arguments parsed when they are JSON)."""
    out = []
    for call in calls:
        function = call.function
        try:
            arguments = json.loads(function.arguments) if function.arguments else {}
        except ValueError:
            arguments = function.arguments
        out.append({"name": function.name, "arguments": arguments})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)
