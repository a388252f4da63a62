"""Task chat: OpenAI fine-tuning files read as they are (checks, per-turn loss masks, tools, scoring)."""

import json

import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import chat
from pipeline.contracts import load_contract
from pipeline.data import LossMaskError, check_loss_masks, token_counter, training_example
from pipeline.demo import CHAT_TEMPLATE, train_tokenizer
from pipeline.recipe import RecipeError
from pipeline.splits import ContractRun, TemplateCannotRender, over_threshold, validate_split
from pipeline.tasks import get_task

CONTRACT = ROOT / "data_contracts" / "openai_chat.yaml"
CHAT = get_task("chat")

TOOLS = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}]


def call(call_id="call_1", name="lookup_order", arguments='{"order_id": 12}'):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Route the ticket."},
        {"role": "user", "content": "my thing is broken"},
        {"role": "assistant", "content": "Which product is it?", "weight": 0},
        {"role": "user", "content": "the router"},
        {"role": "assistant", "content": '{"queue": "technical", "priority": "normal"}', "weight": 1},
    ]
}
TOOL_ROW = {
    "messages": [
        {"role": "system", "content": "Route the ticket."},
        {"role": "user", "content": [{"type": "text", "text": "order 12 "}, {"type": "text", "text": "is lost"}]},
        {"role": "assistant", "content": None, "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "lost"}'},
        {"role": "assistant", "content": '{"queue": "shipping", "priority": "high"}'},
    ],
    "tools": TOOLS,
}


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE with the demo chat template (ChatML turns, Hermes-style tool calls)."""
    corpus = [json.dumps(MULTI_TURN), json.dumps(TOOL_ROW), "route the ticket queue priority shipping order"] * 20
    tok = train_tokenizer(corpus, 400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Loss masks, token by token


def expected_labels(tokenizer, row):
    """Labels built independently: the rendered text cut at each assistant turn, each piece tokenized alone."""
    text = tokenizer.apply_chat_template(
        chat.template_messages(row["messages"]), tools=row.get("tools"), tokenize=False
    )
    pieces, at = [], 0
    for index, message in enumerate(row["messages"]):
        if message["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(
                chat.template_messages(row["messages"][:index]),
                tools=row.get("tools"),
                tokenize=False,
                add_generation_prompt=True,
            )
        )
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        pieces += [(text[at:start], False), (text[start:end], message.get("weight", 1) == 1)]
        at = end
    pieces.append((text[at:], False))
    labels = []
    for piece, trained in pieces:
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        labels += ids if trained else [-100] * len(ids)
    return labels


@pytest.mark.parametrize("row", [MULTI_TURN, TOOL_ROW], ids=["multi_turn_weights", "tool_calls"])
def test_labels_cover_exactly_the_trained_assistant_turns(tokenizer, row):
    example = training_example({**row, "_row": 7}, CHAT, "chat", tokenizer)
    labels = [t if m else -100 for t, m in zip(example["input_ids"], example["assistant_masks"], strict=True)]
    assert labels == expected_labels(tokenizer, row)
    trained = tokenizer.decode([t for t in labels if t != -100])
    if row is MULTI_TURN:
        # The weight-0 question, the system and user turns are not trained; the answer and its end-of-turn are.
        assert trained == '{"queue": "technical", "priority": "normal"}<|im_end|>'
    else:
        assert trained == (
            '<tool_call>{"name": "lookup_order", "arguments": {"order_id": 12}}</tool_call><|im_end|>'
            '{"queue": "shipping", "priority": "high"}<|im_end|>'
        )
    assert example["row"] == 7


def test_packing_keeps_each_conversation_and_its_turn_masks_whole(tokenizer):
    """training.packing on chat examples, step by step as TRL trains them: labels built from assistant_masks,
    then best-fit-decreasing packing, then the padding-free collator. Every packed segment is one whole
    conversation with its own labels, and position ids restart at each one (no attention across them)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for i in range(12):
        row = json.loads(json.dumps([MULTI_TURN, TOOL_ROW][i % 2]))
        row["messages"][1]["content"] = f"ticket {i} " * (1 + i % 5)
        rows.append(row)
    examples = [training_example({**r, "_row": i}, CHAT, "chat", tokenizer) for i, r in enumerate(rows)]
    labelled = {
        "input_ids": [e["input_ids"] for e in examples],
        "labels": [[t if m else -100 for t, m in zip(e["input_ids"], e["assistant_masks"], strict=True)]
                   for e in examples],
    }  # fmt: skip
    longest = max(len(ids) for ids in labelled["input_ids"])
    packed = pack_dataset(Dataset.from_dict(labelled), seq_length=2 * longest, strategy="bfd")
    assert len(packed) < len(examples)  # something was packed
    whole = dict(zip(map(tuple, labelled["input_ids"]), labelled["labels"], strict=True))
    seen = 0
    for row in packed:
        at = 0
        for length in row["seq_lengths"]:
            ids = tuple(row["input_ids"][at : at + length])
            assert ids in whole  # a whole conversation, never a piece of one
            assert row["labels"][at : at + length] == whole[ids]
            at, seen = at + length, seen + 1
    assert seen == len(examples)
    collator = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)
    batch = collator([packed[0]])
    assert batch["labels"][0].tolist() == packed[0]["labels"]
    assert batch["position_ids"][0].tolist() == [p for length in packed[0]["seq_lengths"] for p in range(length)]


def test_each_trained_turn_must_end_with_the_end_of_turn_token(tokenizer):
    eos = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    example = training_example({**TOOL_ROW, "_row": 3}, CHAT, "chat", tokenizer)
    labels = [t if m else -100 for t, m in zip(example["input_ids"], example["assistant_masks"], strict=True)]
    good = {"row": 3, "input_ids": example["input_ids"], "labels": labels}
    counts = check_loss_masks([good], [3], eos, 512, per_turn=True)
    assert counts["trained_turns"] == 2 and counts["turns_cut_by_max_length"] == 0

    first_end = labels.index(next(iter(eos)))
    broken = list(labels)
    broken[first_end] = -100  # the first turn now ends before its end-of-turn token
    with pytest.raises(LossMaskError, match="does not end with the end-of-turn token.*lines 3"):
        check_loss_masks([{**good, "labels": broken}], [3], eos, 512, per_turn=True)

    cut = len(labels) - 3  # truncated by max_length inside the final turn: counted and reported, not fatal
    truncated = {"row": 3, "input_ids": example["input_ids"][:cut], "labels": labels[:cut]}
    counts = check_loss_masks([truncated], [3], eos, cut, per_turn=True)
    assert counts["turns_cut_by_max_length"] == 1 and counts["rows_with_cut_turns"] == [3]


def test_a_template_that_drops_tool_calls_is_an_error_naming_the_rows(tmp_path):
    tok = train_tokenizer(["route the ticket"] * 20, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_rows(tmp_path / "train.jsonl", [MULTI_TURN, TOOL_ROW])
    run = ContractRun(load_contract(CONTRACT), measure_tokens=token_counter(tok, CHAT, "chat"), max_length=512)
    with pytest.raises(TemplateCannotRender, match=r"rows 2: .*tool call 'lookup_order'"):
        run.split("train", path)
    # `plan` reads no data otherwise, but it renders the rows with tools the same way before a GPU is booked.
    from types import SimpleNamespace

    from pipeline.data import check_tool_rendering

    recipe = SimpleNamespace(data=SimpleNamespace(train=str(path), eval=str(tmp_path / "absent.jsonl")))
    with pytest.raises(TemplateCannotRender, match=r"train.jsonl: rows 2: .*tool call 'lookup_order'"):
        check_tool_rendering(recipe, tok)


# --------------------------------------------------------------------------------------------------
# The OpenAI contract: every malformed kind quarantined with its reason


MALFORMED = {
    "not_json": ('{"messages": [', "json"),
    "no_messages": ({"prompt": "x"}, "required"),
    "empty_messages": ({"messages": []}, "min_items"),
    "unknown_role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role"),
    "content_type": (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        "content_type",
    ),
    "assistant_empty": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
        "assistant_empty",
    ),
    "weight": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]},
        "weight",
    ),
    "tool_call_id": (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [call()]},
                {"role": "tool", "tool_call_id": "call_9", "content": "{}"},
                {"role": "assistant", "content": "y"},
            ]
        },
        "tool_call_id",
    ),
    "last_message": (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "user", "content": "z"},
            ]
        },
        "last_message",
    ),
    "no_prompt": ({"messages": [{"role": "assistant", "content": "y"}]}, "no_prompt"),
    "no_trainable": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
        "no_trainable",
    ),
    "tool_arguments": (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [call(arguments="{oops")]},
            ]
        },
        "tool_arguments",
    ),
    "legacy_ambiguous": (
        {
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "functions": [],
            "tools": [],
        },
        "legacy_functions",
    ),
}


def test_every_malformed_kind_is_quarantined_with_its_reason(tmp_path):
    good = [MULTI_TURN, TOOL_ROW]
    rows = good + [row for row, _ in MALFORMED.values()]
    result = validate_split("train", write_rows(tmp_path / "train.jsonl", rows), load_contract(CONTRACT))
    assert result.rows_in == len(rows) and result.rows_accepted == 2
    assert result.rows_in == result.rows_accepted + result.rows_quarantined  # nothing lost
    by_line = {q["row"]: {r["check"] for r in q["reasons"]} for q in result.quarantined}
    for line, (kind, (_, check)) in enumerate(MALFORMED.items(), start=len(good) + 1):
        assert check in by_line[line], (kind, by_line[line])
    messages = {q["row"]: [r["message"] for r in q["reasons"]] for q in result.quarantined}
    assert any(
        "matches no earlier tool call" in m for m in messages[len(good) + 1 + list(MALFORMED).index("tool_call_id")]
    )


def test_legacy_functions_are_converted_to_tools(tmp_path):
    legacy = {
        "messages": [
            {"role": "user", "content": "order 12?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "lookup_order", "arguments": '{"order_id": 12}'},
            },
            {"role": "function", "name": "lookup_order", "content": '{"status": "lost"}'},
            {"role": "assistant", "content": "It is lost."},
        ],
        "functions": [{"name": "lookup_order", "parameters": {"type": "object"}}],
    }
    result = validate_split("train", write_rows(tmp_path / "t.jsonl", [legacy]), load_contract(CONTRACT))
    assert result.rows_accepted == 1
    row = result.rows[0]
    assert row["tools"] == [{"type": "function", "function": legacy["functions"][0]}]
    assert row["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup_order"
    assert row["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "lost"}'}


def test_a_conversation_longer_than_max_length_is_quarantined(tokenizer, tmp_path):
    long = {"messages": [{"role": "user", "content": "order " * 300}, {"role": "assistant", "content": "ok"}]}
    path = write_rows(tmp_path / "train.jsonl", [MULTI_TURN, long])
    run = ContractRun(load_contract(CONTRACT), measure_tokens=token_counter(tokenizer, CHAT, "chat"), max_length=128)
    result = run.split("train", path)
    assert [q["row"] for q in result.quarantined] == [2]
    assert result.quarantined[0]["reasons"][0]["check"] == "max_tokens"


def test_duplicates_and_leakage_compare_the_conversation_before_its_answer(tmp_path):
    other_answer = json.loads(json.dumps(MULTI_TURN))
    other_answer["messages"][-1]["content"] = '{"queue": "billing", "priority": "low"}'
    train = write_rows(tmp_path / "train.jsonl", [MULTI_TURN, other_answer])
    evaluation = write_rows(tmp_path / "eval.jsonl", [TOOL_ROW, MULTI_TURN])
    run = ContractRun(load_contract(CONTRACT))
    t, e = run.split("train", train), run.split("eval", evaluation)
    run.finish()
    assert [q["reasons"][0]["check"] for q in t.quarantined] == ["exact_duplicate"]  # same prompt, other answer
    assert [(q["row"], q["reasons"][0]["check"]) for q in e.quarantined] == [(2, "leakage")]


def test_redact_policy_reaches_every_message_and_tool_arguments(tmp_path):
    contract = load_contract(CONTRACT).model_copy(
        update={"conversation": load_contract(CONTRACT).conversation.model_copy(update={"pii": "redact"})}
    )
    row = json.loads(json.dumps(TOOL_ROW))
    row["messages"][1]["content"] = [{"type": "text", "text": "my SSN is 536-22-8841, order 12 lost"}]
    row["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"ssn": "536-22-8841"}'
    result = validate_split("train", write_rows(tmp_path / "t.jsonl", [row]), contract)
    kept = json.dumps(result.rows[0])
    assert "536-22-8841" not in kept and kept.count("<US_SSN>") == 2
    json.loads(result.rows[0]["messages"][2]["tool_calls"][0]["function"]["arguments"])  # still JSON


@pytest.mark.parametrize(
    ("rows", "contract", "says"),
    [
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4, CONTRACT, "preference (DPO)"),
        ([{"prompt": "p", "completion": "a"}] * 4, CONTRACT, "prompt/completion"),
        (
            [MULTI_TURN] * 4,
            ROOT / "data_contracts" / "medical_coding.yaml",
            "task: chat with data_contracts/openai_chat",
        ),
    ],
)
def test_a_file_in_another_format_gets_one_clear_error(tmp_path, rows, contract, says):
    loaded = load_contract(contract)
    result = validate_split("train", write_rows(tmp_path / "train.jsonl", rows), loaded)
    problems = over_threshold(loaded, [result])
    assert len(problems) == 1 and says in problems[0]


# --------------------------------------------------------------------------------------------------
# Scoring the final assistant message


def test_scoring_compares_text_json_and_tool_calls():
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Hello   there"}]},
        {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": '{"a": 1, "b": [2]}'}]},
        {
            "messages": [
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": None, "tool_calls": [call()]},
            ]
        },
        {"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "no"}]},
    ]
    answers = [
        "Hello there",
        '{"b": [2], "a": 1}',
        '<tool_call>{"name": "lookup_order", "arguments": {"order_id": 12}}</tool_call>',
        "yes",
    ]
    golds = [CHAT.gold(r) for r in rows]
    preds = [CHAT.parse(a) for a in answers]
    scores = CHAT.score(golds, preds)
    assert scores["exact_match"] == pytest.approx(0.75)
    assert scores["tool_call_accuracy"] == 1.0 and scores["json_valid_rate"] == 1.0
    stats = [CHAT.example_stats(g, p) for g, p in zip(golds, preds, strict=True)]
    assert CHAT.main_from_totals([sum(s[0] for s in stats), sum(s[1] for s in stats)]) == pytest.approx(0.75)
    # The eval prompt is the conversation before the answer, with the row's tools.
    assert CHAT.chat_messages({**TOOL_ROW, "_row": 1})[-1]["role"] == "tool"
    assert CHAT.target(rows[2]) == '{"tool_calls": [{"name": "lookup_order", "arguments": {"order_id": 12}}]}'


def test_recipe_refuses_chat_settings_that_cannot_work(recipe_with, tmp_path):

    from pipeline.recipe import load_recipe

    with pytest.raises(RecipeError, match="prompt_format: plain cannot render conversations"):
        load_recipe(recipe_with("plain.yaml", task="chat", data={"prompt_format": "plain"}))
    baseline = {"provider": "anthropic", "model": "claude-x", "send_data": False}
    with pytest.raises(RecipeError, match="provider anthropic cannot take OpenAI-format conversations"):
        load_recipe(recipe_with("anthropic.yaml", task="chat", baseline=baseline))


# --------------------------------------------------------------------------------------------------
# No traceback for any chat row

messages_strategy = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*chat.ROLES, "bot", 3])},
        optional={
            "content": st.one_of(
                st.none(),
                st.text(max_size=8),
                st.integers(),
                st.lists(st.dictionaries(st.sampled_from(["type", "text"]), st.text(max_size=4)), max_size=2),
            ),
            "weight": st.one_of(st.integers(-1, 2), st.booleans(), st.floats(allow_nan=True)),
            "tool_calls": st.one_of(
                st.none(),
                st.just([call()]),
                st.lists(st.dictionaries(st.text(max_size=3), st.text(max_size=3)), max_size=2),
            ),
            "tool_call_id": st.sampled_from(["call_1", "x", None]),
            "function_call": st.one_of(st.none(), st.just({"name": "f", "arguments": "{}"}), st.text(max_size=3)),
            "name": st.sampled_from(["f", "lookup_order"]),
        },
    ),
    max_size=5,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"messages": st.one_of(messages_strategy, st.text(max_size=3))},
            optional={
                "tools": st.one_of(st.just(TOOLS), st.integers()),
                "functions": st.one_of(st.just([{"name": "f"}]), st.text()),
            },
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_chat_row_is_accepted_or_quarantined_without_a_traceback(tmp_path_factory, tokenizer, rows):
    path = write_rows(tmp_path_factory.mktemp("fuzz") / "train.jsonl", rows)
    run = ContractRun(load_contract(CONTRACT), measure_tokens=token_counter(tokenizer, CHAT, "chat"), max_length=512)
    result = run.split("train", path)  # the demo template renders every row the contract accepts
    assert result.rows_in == result.rows_accepted + result.rows_quarantined
    for row in result.rows:
        example = training_example(row, CHAT, "chat", tokenizer)
        assert any(example["assistant_masks"])


# --------------------------------------------------------------------------------------------------
# End to end on a tiny chat base: validate, train with per-turn masks, evaluate the final turn


@pytest.fixture(scope="module")
def chat_run_recipe(tmp_path_factory, tokenizer):
    """A random-weight tiny Llama with the chat template, 48 train and 6 eval conversations, and a recipe."""
    import random

    import torch
    import yaml
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    rows = []
    for i in range(54):
        queue = rng.choice(["billing", "shipping", "technical"])
        row = json.loads(json.dumps(rng.choice([MULTI_TURN, TOOL_ROW])))
        row["messages"][1]["content"] = f"ticket {i} about a {queue} issue"
        row["messages"][-1]["content"] = json.dumps({"queue": queue, "priority": "normal"})
        rows.append(row)
    write_rows(root / "train.jsonl", rows[:48])
    write_rows(root / "eval.jsonl", rows[48:])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    recipe = {
        "extends": str(ROOT / "recipes" / "quickstart.yaml"),
        "name": "chat-tiny",
        "task": "chat",
        "model": {"path": str(root / "model")},
        "data": {"contract": str(CONTRACT), "train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
        "baseline": {"few_shot": 0},
        "training": {"micro_batch_size": 8, "max_steps": 4, "logging_steps": 2, "save_steps": 100, "max_length": 384},
        "eval": {"batch_size": 6, "max_new_tokens": 8},
        "tracking": {"enabled": False},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_chat_recipe_validates_trains_and_scores_the_final_turn(chat_run_recipe, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["validate", str(chat_run_recipe), "--run-dir", str(tmp_path / "v")]) == 0
    assert main(["plan", str(chat_run_recipe), "--run-dir", str(tmp_path / "p")]) == 0
    assert "rows with tools or tool calls render through the base's chat template" in capsys.readouterr().out
    report = json.loads((tmp_path / "v" / "validation" / "report.json").read_text())
    assert report["splits"]["train"]["rows_accepted"] == 48 and report["dataset"]["tokens"]["status"] == "measured"

    from pipeline.recipe import load_recipe
    from pipeline.train import train

    result = train(load_recipe(chat_run_recipe), run_dir=tmp_path / "run")
    data = result.summary["data"]
    assert data["trained_turns"] > 48  # tool rows train two assistant turns; weight-0 turns none
    assert data["turns_cut_by_max_length"] == 0
    for system in ("base", "finetuned"):
        assert 0.0 <= result.metrics[system]["exact_match"] <= 1.0
    lines = (tmp_path / "run" / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    predictions = [json.loads(line) for line in lines if json.loads(line)["system"] == "finetuned"]
    eval_rows = [json.loads(line) for line in (chat_run_recipe.parent / "eval.jsonl").read_text().splitlines()]
    # The final assistant message is the reference, compared as parsed JSON.
    assert [p["gold"] for p in predictions] == [json.loads(r["messages"][-1]["content"]) for r in eval_rows]


def test_the_judge_sees_the_conversation_with_its_tools_and_calls():
    from pipeline.judge import judge_messages

    messages = judge_messages(CHAT, {**TOOL_ROW, "_row": 1}, "answer one", "answer two", rubric=None)
    user = messages[1]["content"]
    assert "[tools]" in user and '"lookup_order"' in user
    assert 'tool calls: [{"name": "lookup_order", "arguments": "{\\"order_id\\": 12}"}]' in user
    assert "# Reference answer" in user and '{"queue": "shipping", "priority": "high"}' in user
