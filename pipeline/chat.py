"""OpenAI chat-format examples: their checks, their rendering through a chat template, and per-turn loss masks.

One line of an OpenAI supervised fine-tuning file is ``{"messages": [...], "tools": [...],
"parallel_tool_calls": bool}``: roles ``system``, ``user``, ``assistant``, ``tool``; ``content`` a string or a
list of text parts; assistant ``tool_calls`` (``id``, ``type: function``, ``function.name``,
``function.arguments`` as a JSON string); tool messages answer a call by ``tool_call_id``; an assistant message
may carry ``weight`` 0 or 1 (absent: 1, trained). The legacy ``functions``/``function_call`` form is converted
to ``tools``/``tool_calls`` (``normalize``), never dropped.

Loss masks come from the chat template's own rendering, turn by turn: the text of an assistant turn is what the
rendering of the conversation up to and including it adds to the rendering up to it with the generation prompt.
Stock templates have no ``{% generation %}`` markers, so masks are never taken from them.

Leaf module: no torch and no package imports; a tokenizer is passed in by the caller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# Every check ``normalize`` and ``check`` report, by name (the validation report lists each, found or not).
CHECKS = (
    "legacy_functions", "messages", "message_type", "role", "content_type", "weight", "assistant_empty",
    "tool_calls", "tool_arguments", "tool_call_id", "tools", "last_message", "no_prompt",
    "no_trainable",
)  # fmt: skip

# (check, field, message): the caller turns these into its own reason objects.
Problem = tuple[str, str | None, str]


# --------------------------------------------------------------------------------------------------
# Reading an example: the legacy form converted, then OpenAI's documented file checks.


def normalize(row: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The example with legacy ``functions``/``function_call`` turned into ``tools``/``tool_calls``.

    Returns the (possibly new) row and the reasons it cannot be converted; a row without the legacy keys comes
    back as it is. Conversion: ``functions`` -> ``tools`` of ``type: function``; an assistant ``function_call``
    -> one tool call with the id ``call_<message index>``; a ``function`` message (``name``, ``content``) -> a
    ``tool`` message answering the latest call of that name.
    """
    messages = row.get("messages")
    legacy_messages = isinstance(messages, list) and any(
        isinstance(m, dict) and ("function_call" in m or m.get("role") == "function") for m in messages
    )
    if "functions" not in row and not legacy_messages:
        return row, []
    if "tools" in row and "functions" in row:
        return row, [("legacy_functions", "functions", "has both `functions` and `tools`; keep one of them")]
    out = {k: v for k, v in row.items() if k != "functions"}
    if "functions" in row:
        functions = row["functions"]
        if not isinstance(functions, list) or not all(isinstance(f, dict) for f in functions):
            return row, [("legacy_functions", "functions", "`functions` must be a list of function definitions")]
        out["tools"] = [{"type": "function", "function": f} for f in functions]
    if not isinstance(messages, list):
        return out, []
    converted: list[Any] = []
    last_call: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            converted.append(message)
            continue
        message = dict(message)
        call = message.pop("function_call", None)
        if call is not None:
            if message.get("role") != "assistant" or not isinstance(call, dict) or "tool_calls" in message:
                why = "a function_call outside an assistant message, or beside tool_calls"
                return row, [("legacy_functions", f"messages[{index}].function_call", f"cannot convert: {why}")]
            call_id = f"call_{index}"
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": call}]
            if isinstance(call.get("name"), str):
                last_call[call["name"]] = call_id
        if message.get("role") == "function":
            name = message.get("name")
            if name not in last_call:
                why = f"a function message for {name!r} answers no earlier function_call"
                return row, [("legacy_functions", f"messages[{index}]", f"cannot convert: {why}")]
            message = {"role": "tool", "tool_call_id": last_call[name], "content": message.get("content")}
        converted.append(message)
    out["messages"] = converted
    return out, []


def check(row: dict[str, Any]) -> list[Problem]:
    """OpenAI's documented file checks on one (normalized) example; empty when it passes.

    Checks: a ``messages`` list; known roles; content a string or a list of text parts (null only beside tool
    calls); an assistant message with text or tool calls; weight 0 or 1; well-formed tool calls whose
    arguments are a JSON string; a tool message answering an earlier call by its id; the last message from the
    assistant, with a message before it; at least one trained assistant message; ``tools`` a list of function
    definitions.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return [("messages", "messages", "no `messages` list (or an empty one)")]
    problems: list[Problem] = []
    problems += _check_tools(row)
    calls: set[str] = set()
    trained = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(("message_type", where, f"a message must be a JSON object, got {_type(message)}"))
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(("role", f"{where}.role", f"unknown role {_clip(role)!r}; expected one of {list(ROLES)}"))
            continue
        content = message.get("content")
        has_text = bool(content_text(content))
        if not _content_ok(content, allow_null=role == "assistant"):
            problems.append(
                (
                    "content_type",
                    f"{where}.content",
                    f"content must be a string or a list of text parts, got {_type(content)}",
                )  # fmt: skip
            )
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1) or
                                    isinstance(message["weight"], bool)):  # fmt: skip
            problems.append(("weight", f"{where}.weight", "weight must be 0 or 1, and only on assistant messages"))
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                problems += _check_calls(tool_calls, f"{where}.tool_calls", calls)
            if not has_text and not tool_calls:
                problems.append(("assistant_empty", where, "an assistant message with neither text nor tool calls"))
            trained += message.get("weight", 1) == 1
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in calls:
                problems.append(
                    ("tool_call_id", f"{where}.tool_call_id", f"{_clip(call_id)!r} matches no earlier tool call")
                )
        elif message.get("tool_calls") is not None:
            problems.append(("tool_calls", f"{where}.tool_calls", f"tool_calls on a {role} message"))
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") != "assistant":
        problems.append(
            ("last_message", f"messages[{len(messages) - 1}]", "the last message is not from the assistant")
        )
    elif len(messages) == 1:
        # Evaluation prompts with everything before the final answer; a template cannot render nothing.
        problems.append(("no_prompt", "messages", "only an assistant message: no prompt before the answer"))
    if not trained and not any(p[0] in ("role", "message_type") for p in problems):
        problems.append(("no_trainable", "messages", "no assistant message with weight 1: nothing to train on"))
    return problems


def _check_tools(row: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    tools = row.get("tools")
    if tools is not None:
        ok = isinstance(tools, list) and all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            for t in tools
        )  # fmt: skip
        if not ok:
            problems.append(("tools", "tools", "tools must be a list of {type: function, function: {name, ...}}"))
    flag = row.get("parallel_tool_calls")
    if flag is not None and not isinstance(flag, bool):
        problems.append(
            ("tools", "parallel_tool_calls", f"parallel_tool_calls must be true or false, got {_type(flag)}")
        )
    return problems


def _check_calls(tool_calls: Any, where: str, calls: set[str]) -> list[Problem]:
    if not isinstance(tool_calls, list) or not tool_calls:
        return [("tool_calls", where, "tool_calls must be a non-empty list")]
    problems: list[Problem] = []
    for i, call in enumerate(tool_calls):
        at = f"{where}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call, dict) and isinstance(call.get("id"), str) and isinstance(function, dict)):
            problems.append(("tool_calls", at, "a tool call needs an `id` and a `function` object"))
            continue
        if call.get("type", "function") != "function":
            problems.append(("tool_calls", f"{at}.type", f"type {_clip(call.get('type'))!r}; only 'function' exists"))
        if not isinstance(function.get("name"), str) or not function["name"]:
            problems.append(("tool_calls", f"{at}.function.name", "the function name must be a non-empty string"))
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            problems.append(("tool_arguments", f"{at}.function.arguments", f"arguments must be a JSON string, "
                             f"got {_type(arguments)}"))  # fmt: skip
        else:
            try:
                json.loads(arguments)
            except ValueError:
                problems.append(("tool_arguments", f"{at}.function.arguments", "arguments are not valid JSON"))
        calls.add(call["id"])
    return problems


def _content_ok(content: Any, allow_null: bool) -> bool:
    if content is None:
        return allow_null
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    )


def content_text(content: Any) -> str | None:
    """A message's content as one string: a string as is, text parts joined; None for null or a bad shape."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def looks_like(row: Any) -> str | None:
    """The other dataset format a row is in, when it is not chat: what a user should be told to use instead."""
    if not isinstance(row, dict) or "messages" in row:
        return None
    keys = set(row)
    if {"prompt", "chosen", "rejected"} <= keys or {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "a preference (DPO) file (prompt/chosen/rejected): pipeline trains supervised fine-tunes only"
    if {"prompt", "completion"} <= keys:
        return "the legacy prompt/completion format: put each pair in messages (user, assistant) or declare a task"
    if {"note", "codes"} <= keys:
        return "the medical_coding task's rows: use task: medical_coding with data_contracts/medical_coding.yaml"
    if {"text", "label"} <= keys:
        return "the classification task's rows: use task: classification with data_contracts/classification.yaml"
    if {"text", "summary"} <= keys:
        return "the summarization task's rows: use task: summarization with data_contracts/summarization.yaml"
    if {"text", "fields"} <= keys:
        return "the extraction task's rows: use task: extraction with data_contracts/extraction.yaml"
    return None


# --------------------------------------------------------------------------------------------------
# The parts of an example the rest of the pipeline uses.


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template expects them: content one string ('' beside tool calls), no ``weight``.

    Tool-call arguments stay JSON strings, as in OpenAI's format.
    """
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if k != "weight"}
        m["content"] = content_text(message.get("content")) or ""
        out.append(m)
    return out


def split_final(row: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the messages before the final assistant message, that message): what evaluation generates and scores."""
    messages = row["messages"]
    return messages[:-1], messages[-1]


def reference(message: dict[str, Any]) -> Any:
    """The reference answer of an assistant message for scoring: its tool calls, else its text.

    Tool calls become ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` (arguments parsed); text that is a
    JSON object or array is returned parsed, so answers are compared as JSON; any other text as it is.
    """
    calls = message.get("tool_calls")
    if calls:
        return {"tool_calls": [_call(c) for c in calls]}
    text = content_text(message.get("content")) or ""
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


def answer_text(message: dict[str, Any]) -> str:
    """An assistant message as one answer string: its text, or its tool calls as compact JSON."""
    value = reference(message)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    arguments = function.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments
    except ValueError:
        parsed = arguments
    return {"name": function["name"], "arguments": parsed if parsed is not None else {}}


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def canonical_answer(text: str) -> str:
    """A generated answer in the form references are compared in.

    Tool calls written the Hermes/Qwen way (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, as the
    demo template and many open chat templates render them) become the ``{"tool_calls": [...]}`` JSON of
    ``reference``; a call whose JSON does not parse keeps the text (a wrong answer). Anything else is the text.
    """
    blocks = _TOOL_CALL.findall(text)
    if not blocks:
        return text.strip()
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except ValueError:
            return text.strip()
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            return text.strip()
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"name": call["name"], "arguments": arguments})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def prompt_text(row: dict[str, Any]) -> str:
    """The conversation before its final assistant message as plain text: what duplicates and leakage compare.

    Two rows that ask the same thing in the same conversation are the same example, whatever they answer. System
    messages are left out: a fine-tuning file usually repeats one system prompt on every row, and in it every
    pair of short conversations would look alike.
    """
    messages = row.get("messages")
    if not isinstance(messages, list):
        return ""
    parts = []
    for message in messages[:-1]:
        if not isinstance(message, dict) or message.get("role") == "system":
            continue
        parts.append(content_text(message.get("content")) or "")
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                parts += [str(call["function"].get("name", "")), str(call["function"].get("arguments", ""))]
    return " ".join(p for p in parts if p)


def map_texts(row: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """The row with ``fn`` applied to every message's text and every tool call's arguments (PII redaction)."""
    messages = []
    for message in row.get("messages") or []:
        if not isinstance(message, dict):
            messages.append(message)
            continue
        m = dict(message)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = fn(content)
        elif isinstance(content, list):
            m["content"] = [
                {**p, "text": fn(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content
            ]
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_map_arguments(c, fn) for c in m["tool_calls"]]
        messages.append(m)
    return {**row, "messages": messages}


def _map_arguments(call: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = call["function"]
        if isinstance(function.get("arguments"), str):
            return {**call, "function": {**function, "arguments": fn(function["arguments"])}}
    return call


# --------------------------------------------------------------------------------------------------
# Rendering through the chat template, and the per-turn loss mask.


class TemplateProblem(ValueError):
    """The chat template cannot render an example, or does not render it turn by turn (message says why)."""


@dataclass(frozen=True)
class Tokenized:
    """One conversation as training input: its tokens, which of them are trained, and its turns.

    ``turns``: per assistant message, (first token, end token, trained) in token positions; ``prompt_tokens``:
    the tokens before the final assistant turn.
    """

    input_ids: list[int]
    mask: list[int]
    turns: list[tuple[int, int, bool]]
    prompt_tokens: int


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool = False) -> str:
    """The template's text for ``messages`` (and ``tools``)."""
    try:
        return tokenizer.apply_chat_template(
            template_messages(messages), tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja2's TemplateError, or a template's own raise_exception(): the reason is the text
        raise TemplateProblem(f"the chat template cannot render it: {exc}") from None


def assistant_spans(tokenizer: Any, row: dict[str, Any]) -> tuple[str, list[tuple[int, int, bool]], int]:
    """The rendered conversation and each assistant turn's character span (start, end, trained).

    A turn's span is what rendering up to it adds after rendering the turns before with the generation prompt,
    trailing whitespace excluded, so it ends with the template's end-of-turn token. The last value is where
    the final assistant turn starts (the end of its prompt).

    Raises:
        TemplateProblem: The template fails, or renders earlier turns differently once later ones follow (then
            no per-turn mask is exact), or leaves a tool call out.
    """
    messages, tools = row["messages"], row.get("tools")
    full = render(tokenizer, messages, tools)
    spans = []
    prompt_end = 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(tokenizer, messages[:index], tools, generation_prompt=True)
        through = render(tokenizer, messages[: index + 1], tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateProblem(
                f"the chat template renders the turns before message {index} differently once it follows, so the "
                "tokens of each assistant turn cannot be told apart (e.g. it drops earlier reasoning)"
            )
        end = len(through.rstrip())
        spans.append((len(before), end, message.get("weight", 1) == 1))
        prompt_end = len(before)
        for call in message.get("tool_calls") or []:
            name = call["function"]["name"]
            if name not in through[len(before) :]:
                raise TemplateProblem(
                    f"the chat template leaves out the tool call {name!r} of message {index}: it cannot render tool "
                    "calls; use a base whose chat template renders `tool_calls` (and `tools`)"
                )
    for tool in row.get("tools") or []:
        name = tool["function"]["name"]
        if name not in full:
            raise TemplateProblem(
                f"the chat template leaves out the tool definition {name!r}: it does not render `tools`; use a base "
                "whose chat template renders tools"
            )
    return full, spans, prompt_end


def tokenize(tokenizer: Any, row: dict[str, Any]) -> Tokenized:
    """The conversation's tokens and loss mask: 1 on the tokens of assistant turns with weight 1, else 0.

    The rendered text is tokenized once (no special tokens added: the template writes them), and a token is in
    a turn when it starts inside the turn's character span (offsets from the fast tokenizer).
    """
    full, spans, prompt_end = assistant_spans(tokenizer, row)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    mask = [0] * len(ids)
    turns = []
    starts = [start for start, _ in offsets]
    prompt_tokens = sum(1 for s in starts if s < prompt_end)
    for start, end, trained in spans:
        first = next((i for i, s in enumerate(starts) if s >= start), len(ids))
        stop = next((i for i, s in enumerate(starts) if s >= end), len(ids))
        turns.append((first, stop, trained))
        if trained:
            for i in range(first, stop):
                mask[i] = 1
    return Tokenized(ids, mask, turns, prompt_tokens)


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _clip(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
