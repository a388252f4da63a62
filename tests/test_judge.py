"""The pairwise judge over HTTP through the real openai and anthropic SDKs, against fake servers on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_llm import FakeLLM

from pipeline.judge import judge_pairs, parse_verdict, run_judge, structured_output
from pipeline.recipe import JudgeSection
from pipeline.tasks import get_task

KEY_ENV = "PIPELINE_TEST_JUDGE_KEY"
KEY = "sk-judge-NEVER-WRITE-ME-77c1e0"
TASK = get_task("summarization")


def make_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"doc-{i}",
            "text": f"document {i}: the committee met and approved plan {i}.",
            "summary": f"plan {i} approved",
            "_row": i + 1,
        }
        for i in range(n)
    ]


def parts(messages: list[dict]) -> dict[str, str]:
    """The judge prompt's sections: 'Reference answer', 'Answer A', 'Answer B'."""
    text = messages[-1]["content"]
    out, name = {}, None
    for chunk in text.split("\n\n"):
        if chunk.startswith("# "):
            name = chunk[2:]
            out[name] = ""
        elif name:
            out[name] = (out[name] + "\n\n" + chunk).strip()
    return out


def always_first(messages: list[dict]) -> str:
    return json.dumps({"winner": "A", "reason": "A is listed first"})


def prefers_reference(messages: list[dict]) -> str:
    p = parts(messages)
    ref = p["Reference answer"]
    winner = "A" if p["Answer A"] == ref else "B" if p["Answer B"] == ref else "tie"
    return json.dumps({"winner": winner, "reason": f"answer {winner} says what the reference says"})


def settings(server: FakeLLM, **changes) -> JudgeSection:
    values = {
        "provider": server.api,
        "model": "judge-model",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "send_data": True,
        "timeout_s": 0.5,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retries": 2,
        "max_concurrency": 2,
        "price_input_per_1m": 1.0,
        "price_output_per_1m": 2.0,
    }
    return JudgeSection(**{**values, **changes})


def outputs(rows: list[dict], finetuned_right: bool = True) -> dict[str, list[dict]]:
    """The fine-tune answers with the reference summary; the baseline with a wrong one (or the reverse)."""
    right = [{"text": r["summary"], "stopped": True} for r in rows]
    wrong = [{"text": f"the committee adjourned {r['id']}", "stopped": True} for r in rows]
    return {"finetuned": right if finetuned_right else wrong, "baseline": wrong if finetuned_right else right}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(params=["openai", "anthropic"])
def provider(request) -> str:
    return request.param


@pytest.fixture
def serve():
    servers = []

    def start(api: str, answer, faults=None, **kwargs) -> FakeLLM:
        server = FakeLLM(api, answer, faults, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def judge(server_settings: JudgeSection, rows, outs, tmp_path: Path, contract=None, samples=400):
    return run_judge(
        server_settings,
        TASK,
        rows,
        outs,
        allowed_hosts=[],
        contract=contract,
        cache_dir=tmp_path / "judge_cache",
        eval_dir=tmp_path / "eval",
        samples=samples,
    )


def test_a_judge_that_always_picks_the_first_answer_gives_only_inconsistent_ties(provider, serve, tmp_path):
    server = serve(provider, always_first)
    rows = make_rows(8)
    result = judge(settings(server), rows, outputs(rows), tmp_path)
    s = result.summary
    assert len(server.requests) == 16  # every example in both orders
    assert (s["wins"], s["losses"], s["ties"], s["inconsistent"], s["failed"]) == (0, 0, 8, 8, 0)
    assert s["win_rate"] == 0.5 and s["ci95"] == [0.5, 0.5]
    assert s["verdict"] == "no significant difference" and s["model"] == "judge-model"
    records = [json.loads(line) for line in (tmp_path / "eval" / "judge.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["outcome"] for r in records} == {"inconsistent"}
    # Both verdicts and both reasons are kept, with the system each letter stood for.
    assert [(v["order"], v["A"], v["winner_system"]) for v in records[0]["verdicts"]] == [
        ("AB", "finetuned", "finetuned"),
        ("BA", "baseline", "baseline"),
    ]
    assert records[0]["verdicts"][0]["reason"] == "A is listed first"
    # Structured output was asked for in the provider's own way.
    body = server.requests[0]["body"]
    if provider == "openai":
        assert body["response_format"]["json_schema"]["schema"]["properties"]["winner"]["enum"] == ["A", "B", "tie"]
    else:
        assert body["output_config"]["format"]["type"] == "json_schema"


def test_a_judge_preferring_the_reference_gives_the_right_winner(provider, serve, tmp_path):
    server = serve(provider, prefers_reference)
    rows = make_rows(12)
    s = judge(settings(server), rows, outputs(rows), tmp_path).summary
    assert (s["wins"], s["losses"], s["ties"], s["inconsistent"]) == (12, 0, 0, 0)
    assert s["win_rate"] == 1.0 and s["verdict"] == "better"
    # The prompt held the task input and the reference.
    prompt = server.requests[0]["body"]["messages"][-1]["content"]
    assert "document 0: the committee met" in prompt and "# Reference answer\n\nplan 0 approved" in prompt
    worse = judge(settings(server), rows, outputs(rows, finetuned_right=False), tmp_path / "other").summary
    assert (worse["wins"], worse["losses"], worse["verdict"]) == (0, 12, "worse")
    # win_rate = (wins + ties / 2) / judged
    mixed = outputs(rows)
    for i in range(3):
        mixed["finetuned"][i] = mixed["baseline"][i]  # same answer both sides: the judge says tie
    s = judge(settings(server), rows, mixed, tmp_path / "mixed").summary
    assert (s["wins"], s["ties"], s["judged"]) == (9, 3, 12) and s["win_rate"] == pytest.approx((9 + 1.5) / 12)


def test_malformed_judge_replies_are_retried_then_counted_failed(provider, serve, tmp_path):
    rows = make_rows(4)

    def answer(messages):
        index = int(messages[-1]["content"].split("document ", 1)[1].split(":")[0])
        if index == 0:
            return "I think answer A is better because it is shorter."  # prose, every time
        if index == 1:
            return '{"winner": "C", "reason": "neither"}'  # not a winner the protocol knows
        return prefers_reference(messages)

    server = serve(provider, answer)
    result = judge(settings(server, max_retries=2), rows, outputs(rows), tmp_path)
    s = result.summary
    # Rows 0 and 1: 2 orders x (1 + 2 retries) = 6 requests each; rows 2 and 3: 2 each.
    assert len(server.requests) == 16 and s["retries"] == 8
    assert (s["wins"], s["failed"], s["judged"]) == (2, 2, 2)
    assert s["failures_by_kind"] == {"judge_malformed": 2}
    failed = [r for r in result.records if r["outcome"] == "failed"]
    assert "judge replied without one JSON object" in failed[0]["error"]
    assert "not one of A, B, tie" in failed[1]["error"]
    assert failed[0]["verdicts"] == []  # nothing is guessed from the prose


def test_faults_and_empty_answers_end_as_counted_failures(serve, tmp_path):
    rows = make_rows(5)

    def faults(prompt, attempt):
        if "document 0:" in prompt:
            return "429"
        if "document 1:" in prompt:
            return "500"
        if "document 2:" in prompt:
            return "timeout"  # the judge stalls past timeout_s every time
        return None

    server = serve("openai", prefers_reference, faults)
    outs = outputs(rows)
    outs["baseline"][3] = {"text": "  ", "stopped": True}  # an empty answer: nothing to judge
    outs["baseline"][4] = {"text": "", "stopped": False, "error": "server_error: 500"}
    s = judge(settings(server, max_retries=1), rows, outs, tmp_path).summary
    assert s["failed"] == 5 and s["judged"] == 0 and s["win_rate"] is None and s["verdict"] == "not judged"
    assert s["failures_by_kind"] == {
        "judge_rate_limited": 1,
        "judge_server_error": 1,
        "judge_timeout": 1,
        "empty_answer": 1,
        "no_answer": 1,
    }
    # Rows 3 and 4 were never sent; rows 0-2: 2 orders x 2 attempts.
    assert len(server.requests) == 12 and "document 3:" not in json.dumps([r["body"] for r in server.requests])


def test_a_rerun_sends_zero_requests_and_an_interrupted_run_resumes(provider, serve, tmp_path):
    rows = make_rows(6)
    server = serve(provider, prefers_reference)
    first = judge(settings(server), rows, outputs(rows), tmp_path).summary
    assert first["requests_sent"] == 12 and first["rows_sent"] == 6 and first["requests_logged"] == 12
    again = judge(settings(server), rows, outputs(rows), tmp_path).summary
    assert len(server.requests) == 12 and again["requests_sent"] == 0 and again["judgements_from_cache"] == 12
    assert again["rows_sent"] == 0 and again["rows_sent_all_runs"] == 6
    assert (again["wins"], again["win_rate"]) == (first["wins"], first["win_rate"])
    # A run cut short: 3 judgements lost from the cache; the next run asks exactly those.
    for path in sorted((tmp_path / "judge_cache").glob("*.json"))[:3]:
        path.unlink()
    resumed = judge(settings(server), rows, outputs(rows), tmp_path).summary
    assert resumed["requests_sent"] == 3 and len(server.requests) == 15 and resumed["wins"] == 6


def test_send_data_false_sends_nothing_and_says_why(provider, serve, tmp_path):
    server = serve(provider, always_first)
    rows = make_rows(3)
    s = judge(settings(server, send_data=False), rows, outputs(rows), tmp_path).summary
    assert server.requests == [] and s["status"] == "skipped" and "judge.send_data is false" in s["reason"]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "judge_cache").exists()
    # A host that is neither loopback nor allowed gets nothing either (refused before any connection).
    far = JudgeSection(provider="openai", model="m", base_url="https://judge.example.com/v1", send_data=True)
    s = judge(far, rows, outputs(rows), tmp_path).summary
    assert s["status"] == "skipped" and "not on privacy.allowed_hosts" in s["reason"]


def test_every_row_sent_is_recorded_by_hash_and_the_key_is_written_nowhere(serve, tmp_path, monkeypatch):
    from pipeline.baseline import row_hash

    rows = make_rows(3)
    server = serve("openai", lambda m: "prose")
    judge(settings(server, max_retries=0), rows, outputs(rows), tmp_path)
    sent = [json.loads(line) for line in (tmp_path / "eval" / "judge_sent.jsonl").read_text().splitlines()]
    assert {e["row_sha256"] for e in sent} == {row_hash(r) for r in rows}
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"  # the key went where it belongs
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path
    # No key in the environment: nothing is sent, and the variable is named.
    monkeypatch.delenv(KEY_ENV)
    s = judge(settings(server), make_rows(4), outputs(make_rows(4)), tmp_path / "nokey").summary
    assert s["status"] == "skipped" and KEY_ENV in s["reason"] and len(server.requests) == 6


def test_answers_with_pii_are_redacted_or_blocked_by_the_contract_policy(serve, tmp_path):
    import yaml

    from pipeline.contracts import load_contract

    ssn = "536-22-8726"
    rows = make_rows(2)
    outs = outputs(rows)
    outs["baseline"][0] = {"text": f"the patient's SSN is {ssn}", "stopped": True}
    server = serve("openai", prefers_reference)
    data = yaml.safe_load(Path("data_contracts/summarization.yaml").read_text())
    for policy in ("redact", "block"):
        data["pii"] = {"entities": ["US_SSN"]}
        data["fields"]["text"]["pii"] = policy
        (tmp_path / f"{policy}.yaml").write_text(yaml.safe_dump(data))
        contract = load_contract(tmp_path / f"{policy}.yaml")
        result = judge(settings(server), rows, outs, tmp_path / policy, contract=contract)
        assert ssn not in json.dumps([r["body"] for r in server.requests])
        assert ssn not in (tmp_path / policy / "eval" / "judge.jsonl").read_text()
        if policy == "redact":
            assert "<US_SSN>" in json.dumps([r["body"] for r in server.requests])
            assert result.summary["failed"] == 0
        else:
            assert result.summary["failures_by_kind"] == {"pii_blocked": 1}


def test_pairs_default_and_verdict_parsing():
    s = JudgeSection(model="m", base_url="http://127.0.0.1:1/v1")
    assert judge_pairs(s, ["base", "finetuned", "baseline"]) == [("finetuned", "baseline")]
    assert judge_pairs(s, ["base", "finetuned"]) == [("finetuned", "base")]
    both = JudgeSection(model="m", base_url="http://127.0.0.1:1/v1", pairs=["finetuned vs base", "baseline vs base"])
    assert judge_pairs(both, ["base", "finetuned"]) == [("finetuned", "base")]
    assert parse_verdict('```json\n{"winner": "tie", "reason": "same"}\n```') == {"winner": "tie", "reason": "same"}
    assert "response_format" in structured_output("openai") and "output_config" in structured_output("anthropic")


def test_the_report_shows_where_the_fine_tune_loses_side_by_side(serve, tmp_path):
    from pipeline.judge import report_lines

    server = serve("openai", prefers_reference)
    rows = make_rows(3)
    result = judge(settings(server), rows, outputs(rows, finetuned_right=False), tmp_path)
    report = "\n".join(report_lines(result, TASK, rows))
    assert "| finetuned vs baseline | 0 | 3 | 0 | 0 | 0 | 0.000 |" in report
    assert "## Where the fine-tune loses (3; the first 3)" in report
    section = report.split("### finetuned vs baseline, row 1 (id doc-0)", 1)[1].split("###", 1)[0]
    assert "**Input:** document 0: the committee met" in section and "**Reference:** plan 0 approved" in section
    assert "| the committee adjourned doc-0 | plan 0 approved |" in section
    assert "chose B: answer B says what the reference says" in section and "(BA: A = baseline" in section


def test_every_judge_key_can_be_set_from_the_command_line():
    from conftest import ROOT

    from pipeline.recipe import RecipeError, load_recipe

    overrides = [
        "judge.provider=anthropic",
        "judge.model=claude-judge",
        "judge.base_url=http://127.0.0.1:8000",
        "judge.api_key_env=JUDGE_KEY",
        "judge.send_data=true",
        "judge.max_concurrency=3",
        "judge.price_input_per_1m=3",
        "judge.price_output_per_1m=15",
        "judge.rubric=Prefer the shorter answer.",
        "judge.pairs=[finetuned vs base, baseline vs base]",
    ]
    j = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides).judge
    assert (j.provider, j.model, j.base_url, j.api_key_env, j.send_data) == (
        "anthropic",
        "claude-judge",
        "http://127.0.0.1:8000",
        "JUDGE_KEY",
        True,
    )
    assert (j.max_concurrency, j.price_input_per_1m, j.price_output_per_1m) == (3, 3.0, 15.0)
    assert j.rubric == "Prefer the shorter answer." and j.pairs == ["finetuned vs base", "baseline vs base"]
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml").judge is None  # no section, no judge
    with pytest.raises(RecipeError, match="judge.base_url: required") as err:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["judge.model=m"])
    with pytest.raises(RecipeError, match="credential") as err:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["judge.model=m", "judge.base_url=http://u:pw@h/v1"])
    assert "pw" not in str(err.value).replace("password", "")
