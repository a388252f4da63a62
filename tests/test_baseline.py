"""The baseline through the real openai and anthropic SDKs, over HTTP, against fake servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from fake_llm import FakeLLM

from pipeline.baseline import egress_decision, row_hash, run_baseline
from pipeline.recipe import BaselineSection
from pipeline.tasks import get_task

KEY_ENV = "PIPELINE_TEST_BASELINE_KEY"
KEY = "sk-test-NEVER-WRITE-ME-4f9a2c"
TASK = get_task("medical_coding")
CODES = ["I10", "E11.9", "J44.9", "K21.9", "N39.0", "F32.A", "M54.5", "R51.9"]


def make_rows(n: int, prefix: str = "eval") -> list[dict]:
    return [
        {
            "id": f"{prefix}-{i}",
            "note": f"{prefix} note {i}: patient seen today",
            "codes": [CODES[i % 8]],
            "_row": i + 1,
        }
        for i in range(n)
    ]


def gold_answer(messages: list[dict]) -> str:
    """The fake model codes every note right: the note says its index, the code follows from it."""
    index = int(messages[-1]["content"].split()[2].rstrip(":"))
    return CODES[index % 8]


def index_of(prompt: str) -> int:
    return int(prompt.split()[2].rstrip(":"))


def settings(server: FakeLLM, **changes) -> BaselineSection:
    values = {
        "provider": server.api,
        "model": "test-model",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "send_data": True,
        "timeout_s": 0.5,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retries": 3,
        "max_concurrency": 2,
        "price_input_per_1m": 2.5,
        "price_output_per_1m": 10.0,
    }
    return BaselineSection(**{**values, **changes})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(params=["openai", "anthropic"])
def provider(request) -> str:
    return request.param


@pytest.fixture
def serve():
    servers = []

    def start(api: str, faults=None, **kwargs) -> FakeLLM:
        server = FakeLLM(api, gold_answer, faults, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def run(server_settings: BaselineSection, rows: list[dict], tmp_path: Path, train_rows=(), allowed=()):
    return run_baseline(
        server_settings,
        TASK,
        rows,
        train_rows=list(train_rows),
        allowed_hosts=list(allowed),
        cache_dir=tmp_path / "cache",
        eval_dir=tmp_path / "eval",
    )


def scripted(plan: dict[int, list[str]]):
    """Faults per eval row index: the n-th attempt gets plan[index][n-1], later attempts are answered."""

    def faults(prompt: str, attempt: int):
        actions = plan.get(index_of(prompt), [])
        return actions[attempt - 1] if attempt <= len(actions) else None

    return faults


def test_retries_then_answers_and_counts_what_still_fails(provider, serve, tmp_path):
    plan = {0: ["429", "500"], 1: ["timeout"], 2: ["bad_json", "empty"], 3: ["500"] * 10}
    server = serve(provider, scripted(plan))
    result = run(settings(server), make_rows(6), tmp_path)
    outs = result.outputs
    assert result.status == "ok"
    # Attempts: row 0 (429, 500, ok) 3; row 1 (timeout, ok) 2; row 2 (not JSON, no answer, ok) 3;
    # row 3 fails 1 + 3 retries = 4 times; rows 4 and 5 once each: 14 requests, 8 retries.
    assert [o["attempts"] for o in outs] == [3, 2, 3, 4, 1, 1]
    assert len(server.requests) == result.summary["requests_sent"] == 14
    assert result.summary["retries"] == 8
    assert [o["text"] for i, o in enumerate(outs) if i != 3] == [CODES[i] for i in (0, 1, 2, 4, 5)]
    assert outs[3]["error"].startswith("server_error: ") and outs[3]["text"] == ""
    s = result.summary
    assert (s["answered"], s["failed"], s["failures_by_kind"]) == (5, 1, {"server_error": 1})
    # The failed example is scored (as a wrong answer), not dropped.
    from pipeline.evaluate import score_system

    metrics = score_system(TASK, make_rows(6), outs)
    assert metrics["failed"] == 1 and metrics["num_examples"] == 6
    assert metrics["micro_recall"] == pytest.approx(5 / 6)
    # Token usage comes from the provider's answer (the fake counts words) and prices follow from it.
    assert metrics["tokens_out"] == 5 and metrics["tokens_in"] > 0


def test_retry_budget_caps_retries_across_the_run(serve, tmp_path):
    server = serve("openai", lambda prompt, attempt: "500")
    result = run(settings(server, retry_budget=2, max_concurrency=1), make_rows(3), tmp_path)
    # Two retries in all, then each request fails at its first error: 1 + 2 + 1 + 1 = 5 requests.
    assert result.summary["retries"] == 2 and result.summary["retry_budget_left"] == 0
    assert len(server.requests) == 5 and result.summary["failed"] == 3


def test_cache_means_a_second_run_sends_zero_requests(provider, serve, tmp_path):
    server = serve(provider)
    rows = make_rows(5)
    first = run(settings(server), rows, tmp_path)
    assert len(server.requests) == 5 and first.summary["answers_from_cache"] == 0
    second = run(settings(server), rows, tmp_path)
    assert len(server.requests) == 5  # nothing new was sent
    assert second.summary["requests_sent"] == 0 and second.summary["answers_from_cache"] == 5
    assert [o["text"] for o in second.outputs] == [o["text"] for o in first.outputs]
    # A fully cached re-run needs no key at all.
    os.environ.pop(KEY_ENV)
    assert run(settings(server), rows, tmp_path).summary["answers_from_cache"] == 5
    os.environ[KEY_ENV] = KEY
    # A different parameter is a different request: nothing is served from a stale cache.
    run(settings(server, max_tokens=17), rows[:1], tmp_path)
    assert len(server.requests) == 6


def test_interrupted_run_resumes_where_it_stopped(serve, tmp_path):
    server = serve("openai", delay_s=0.25)
    rows = make_rows(12)
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from pipeline.baseline import run_baseline
from pipeline.recipe import BaselineSection
from pipeline.tasks import get_task
settings = BaselineSection(**json.loads(sys.argv[1]))
run_baseline(settings, get_task("medical_coding"), json.loads(sys.argv[2]), train_rows=[], allowed_hosts=[],
             cache_dir=sys.argv[3], eval_dir=sys.argv[4])
"""
    config = settings(server, max_concurrency=1).model_dump(mode="json")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            json.dumps(config),
            json.dumps(rows),
            str(tmp_path / "cache"),
            str(tmp_path / "e"),
        ],
        env={**os.environ, KEY_ENV: KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while len(list((tmp_path / "cache").glob("*.json"))) < 4 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL mid-run: no cleanup code runs
    proc.wait()
    time.sleep(0.5)  # let a request that was already on the wire reach the server's log
    cached = len(list((tmp_path / "cache").glob("*.json")))
    before = {r["prompt"] for r in server.requests}
    assert 4 <= cached < 12, cached
    sent_before = len(server.requests)
    # Every row that left before the kill is on record (logged before its request, not after the run).
    logged = (tmp_path / "e" / "baseline_sent.jsonl").read_text().splitlines()
    # (the row being sent at the kill may be logged without its request having left: one at most)
    assert cached <= len(logged) and sent_before <= len(logged) <= sent_before + 1

    result = run(settings(server), rows, tmp_path)
    resumed = [r["prompt"] for r in server.requests[sent_before:]]
    assert result.summary["answers_from_cache"] == cached
    assert len(resumed) == 12 - cached == result.summary["requests_sent"]
    # Only what had no answer yet was asked again (a request in flight at the kill may be asked twice).
    assert len(set(resumed) & before) <= 1
    assert [o["text"] for o in result.outputs] == [CODES[i % 8] for i in range(12)]


def test_nothing_is_sent_when_send_data_is_false(provider, serve, tmp_path):
    server = serve(provider)
    result = run(settings(server, send_data=False), make_rows(4), tmp_path)
    assert server.requests == []
    assert result.status == "skipped" and result.outputs is None
    assert "baseline.send_data is false" in result.reason and result.summary["rows_sent"] == 0
    assert not (tmp_path / "cache").exists() and not (tmp_path / "eval").exists()


def test_a_host_not_allowed_gets_nothing(tmp_path):
    far = BaselineSection(provider="openai", model="gpt-4o", send_data=True, api_key_env=KEY_ENV)
    result = run(far, make_rows(2), tmp_path)  # api.openai.com: not loopback, not allowed
    assert result.status == "skipped" and "api.openai.com" in result.reason
    assert "privacy.allowed_hosts" in result.reason
    gateway = BaselineSection(provider="openai", model="m", base_url="https://llm.internal/v1", send_data=True)
    assert egress_decision(gateway, ["llm.internal"])[0] is True
    assert egress_decision(gateway, [])[0] is False


def test_missing_key_is_skipped_with_the_variable_named(serve, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    server = serve("openai")
    result = run(settings(server), make_rows(2), tmp_path)
    assert result.status == "skipped" and KEY_ENV in result.reason and server.requests == []


def test_concurrency_stays_within_max_concurrency(serve, tmp_path):
    server = serve("anthropic", delay_s=0.2)
    start = time.perf_counter()
    run(settings(server, max_concurrency=3), make_rows(9), tmp_path)
    assert server.max_in_flight == 3
    # 9 requests of 0.2 s, 3 at a time: ~0.6 s, against 1.8 s one by one.
    assert time.perf_counter() - start < 1.5


def test_refused_key_stops_the_run_and_is_never_written(provider, serve, tmp_path):
    # A provider's 401 often quotes the key it was given; the kept error text must not.
    server = serve(provider, lambda prompt, attempt: "401")
    result = run(settings(server, max_concurrency=1), make_rows(4), tmp_path)
    assert len(server.requests) == 1  # no more requests after the key was refused
    assert result.summary["failures_by_kind"] == {"auth": 1, "not_sent": 3}
    headers = server.requests[0]["headers"]  # the key did reach the provider (anthropic 2.x sends a Bearer too)
    assert (headers.get("x-api-key") or headers["authorization"]).endswith(KEY)
    assert "Incorrect API key provided: ***" in result.outputs[0]["error"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in json.dumps(result.summary) + json.dumps(result.outputs)


def test_only_the_given_rows_and_few_shot_rows_are_sent_and_logged_by_hash(provider, serve, tmp_path):
    server = serve(provider)
    rows, train = make_rows(3), make_rows(10, prefix="train")
    result = run(settings(server, few_shot=2), rows, tmp_path, train_rows=train)
    sent_text = json.dumps([r["body"] for r in server.requests])
    shots = [t for t in train if t["note"] in sent_text]
    assert len(shots) == 2  # the same two train rows in every request
    assert all(
        r["body"]["messages"][-1]["content"] == row["note"]
        for r, row in zip(sorted(server.requests, key=lambda r: index_of(r["prompt"])), rows, strict=True)
    )
    log = [json.loads(line) for line in (tmp_path / "eval" / "baseline_sent.jsonl").read_text().splitlines()]
    assert sorted(e["row_sha256"] for e in log if e["split"] == "eval") == sorted(row_hash(r) for r in rows)
    assert sorted(e["row_sha256"] for e in log if e["split"] == "train") == sorted(row_hash(s) for s in shots)
    assert result.summary["rows_sent"] == 3 and result.summary["few_shot_rows_sent"] == 2
    # Temperature 0 and the fine-tune's own system prompt.
    body = server.requests[0]["body"]
    assert body["temperature"] == 0
    system = body["messages"][0]["content"] if provider == "openai" else body["system"]
    assert system == TASK.system_prompt


def test_recipe_never_holds_a_key():
    from pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            ["baseline.provider=openai", "baseline.model=gpt-4o", f"baseline.api_key_env={KEY}"],
        )
    assert "baseline.api_key_env" in str(caught.value) and KEY not in str(caught.value)


def test_answers_without_token_usage_are_counted_and_the_cost_is_a_lower_bound(provider, serve, tmp_path):
    from pipeline.cost import cost_of_ownership, cost_per_1000_examples, render_cost_lines
    from pipeline.evaluate import render_ops_table, score_system
    from pipeline.recipe import load_recipe

    rows = make_rows(6)
    with_usage = serve(provider)
    run(settings(with_usage), rows[:2], tmp_path)  # two answers with usage, cached
    without = serve(provider, usage=False)  # a gateway that reports no usage answers the other four
    result = run(settings(without), rows, tmp_path)
    assert len(without.requests) == 4 and result.summary["answers_from_cache"] == 2
    assert [o["usage_reported"] for o in result.outputs] == [True, True, False, False, False, False]
    metrics = score_system(TASK, rows, result.outputs)
    assert metrics["usage_not_reported"] == 4
    # Only the two answers with usage count tokens: one word out each (the fake counts words).
    assert metrics["tokens_out"] == 2
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", ["baseline.price_input_per_1m=2.5", "baseline.price_output_per_1m=10"]
    )
    api = cost_of_ownership(recipe, {"baseline": metrics}, "cpu")["api"]
    assert api["answers_without_usage"] == 4 and api["lower_bound"] is True
    metrics["cost_per_1000_examples"] = cost_per_1000_examples(recipe, "baseline", metrics)
    table = render_ops_table({"baseline": metrics})
    assert f"| >={metrics['tokens_out']:,.0f} | >={metrics['cost_per_1000_examples']:.4f} |" in table
    lines = "\n".join(render_cost_lines({"api": api, "self_hosted": None}))
    assert f"| $ per 1,000 cases | n/a | >=${api['cost_per_1000_cases']:.4f} |" in lines
    assert "4 API answers came without token usage" in lines


def test_an_unwritable_cache_sends_nothing_and_says_why(serve, tmp_path):
    server = serve("openai")
    (tmp_path / "file").write_text("not a directory")
    result = run_baseline(
        settings(server),
        TASK,
        make_rows(3),
        train_rows=[],
        allowed_hosts=[],
        cache_dir=tmp_path / "file" / "cache",
        eval_dir=tmp_path / "eval",
    )
    assert result.status == "skipped" and server.requests == []
    assert result.reason.startswith(f"the answer cache {tmp_path / 'file' / 'cache'} cannot be written")
    assert "nothing was sent" in result.reason and "\n" not in result.reason


def test_disk_full_mid_run_keeps_the_answers_and_counts_what_was_not_cached(serve, tmp_path, monkeypatch):
    import errno

    from pipeline import baseline

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    server = serve("openai")
    monkeypatch.setattr(baseline.rundir, "write_json", full)
    rows = make_rows(4)
    result = run(settings(server), rows, tmp_path)
    # Every answer arrived and is scored; none could be cached, and the summary says so.
    assert [o["text"] for o in result.outputs] == [CODES[i] for i in range(4)]
    assert result.summary["failed"] == 0 and result.summary["cache_write_failures"] == 4
    assert result.outputs[0]["cache_error"].endswith(".json: No space left on device")
    # So a re-run has to ask again: that is what the counter warns about.
    run(settings(server), rows, tmp_path)
    assert len(server.requests) == 8


def test_a_sent_log_that_cannot_be_written_stops_sending(serve, tmp_path, monkeypatch):
    import errno

    from pipeline import baseline

    def full(self, entries):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    server = serve("openai")
    monkeypatch.setattr(baseline.SentLog, "_write", full)
    result = run(settings(server, max_concurrency=1), make_rows(3), tmp_path)
    # A row that cannot be put on record is not sent, and neither is any later one: failures, not a crash.
    assert server.requests == [] and result.summary["requests_sent"] == 0
    assert result.summary["failures_by_kind"] == {"not_sent": 3}
    assert "the sent-rows log could not be written" in result.outputs[0]["error"]
    assert "No space left on device" in result.outputs[0]["error"]


def test_cache_only_reports_a_fully_cached_baseline_and_sends_nothing(serve, tmp_path, monkeypatch):
    server = serve("openai")
    rows = make_rows(4)
    run(settings(server), rows[:3], tmp_path)
    assert len(server.requests) == 3
    monkeypatch.delenv(KEY_ENV)  # nothing will be sent, so no key is needed

    def cache_only(some_rows):
        return run_baseline(
            settings(server),
            TASK,
            some_rows,
            train_rows=[],
            allowed_hosts=[],
            cache_dir=tmp_path / "cache",
            eval_dir=tmp_path / "eval",
            cache_only=True,
        )

    partial = cache_only(rows)  # one of four answers is missing: not reported, and not asked
    assert partial.status == "not_cached" and partial.outputs is None
    assert partial.reason.startswith("3 of 4 answers cached")
    full = cache_only(rows[:3])
    assert full.status == "ok" and full.summary["answers_from_cache"] == 3 and full.summary["requests_sent"] == 0
    assert [o["text"] for o in full.outputs] == CODES[:3]
    assert len(server.requests) == 3
