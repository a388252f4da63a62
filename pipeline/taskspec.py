"""The recipe's ``task:`` section: a preset name, or a task declared over the contract's fields.

Merges a preset (``tasks.PRESETS``) with the recipe's own keys and checks the result on its own: the answer
type's parsers and metrics, the templates' syntax and placeholders. Checks against the contract's fields are
``data.task_problems``. Kept out of ``recipe.py`` so each stays readable; a leaf under the recipe (no torch).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import tasks
from pipeline.schema_errors import KeyProblems, did_you_mean


class TaskSection(BaseModel):
    """What the model learns: how a row becomes a prompt and a target, how answers are parsed and scored.

    ``task: NAME`` is a preset (the built-in tasks); ``task:`` as a mapping declares one over any contract's
    fields, optionally starting from a preset (``preset:``) and overriding it key by key. Templates are text with
    ``{field}`` placeholders over the row's fields (a list is joined with ", ", an object written as JSON; ``{{``
    and ``}}`` are literal braces), plus ``{label_set}`` (the target's labels, for ``label``/``labels``) and
    ``{json_fields}`` (the target object's keys, for ``json``). docs/tasks.md walks through one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # as every recipe section

    preset: Literal["medical_coding", "classification", "extraction", "summarization", "chat"] | None = Field(
        default=None,
        description="A built-in task whose values fill every key this section leaves unset (docs/recipe.md lists "
        "them). 'chat': OpenAI's fine-tuning format as it is (multi-turn messages, per-message weight, tool calls; "
        "docs/chat.md).",
    )
    answer: Literal["label", "labels", "json", "text", "number", "chat"] | None = Field(
        default=None,
        description="The answer type: 'label' (one of the target field's enum), 'labels' (a list, from the items' "
        "enum or vocabulary), 'json' (an object with named fields), 'text' (free text), 'number', 'chat' (the "
        "final assistant message of a conversation). It decides the parser and the metrics available.",
    )
    target: str | None = Field(
        default=None, description="The row field holding the answer (a field of the contract, whatever its name)."
    )
    system_prompt: str | None = Field(
        default=None,
        description="The system message. May use {label_set}. Unset: the preset's, else the answer type's default.",
    )
    user_prompt: str | None = Field(
        default=None,
        description="The user message: a template over the row's fields, e.g. 'Clause: {clause_text}'. Required "
        "without a preset.",
    )
    plain_prompt: str | None = Field(
        default=None,
        description="The whole prompt for a base with no chat template (data.prompt_format: plain); the answer "
        "follows after a space. Unset: the preset's (when user_prompt is the preset's too), else user_prompt + "
        "'\\nAnswer:'.",
    )
    parse: Literal["label", "exact", "list", "regex", "json", "text", "number", "chat"] | None = Field(
        default=None,
        description="How an answer is read. label: the exact label, else the first label named; exact: the whole "
        "answer must be a label; list: labels separated by commas, semicolons or lines; regex: every match of "
        "parse_pattern, each once; json: the (outermost) JSON object; text: the stripped answer; number: the first "
        "number. Unset: the preset's, else the answer type's first.",
    )
    parse_pattern: str | None = Field(default=None, description="The regular expression for parse: regex.")
    metrics: list[str] | None = Field(
        default=None,
        description="Metrics in the report tables, from the answer type's set (docs/recipe.md); the first is the "
        "main metric (the margin over the base, the bootstrap interval, the model card). Unset: the preset's, else "
        "the answer type's set.",
    )
    vocabulary: Literal["icd10cm"] | None = Field(
        default=None,
        description="answer: labels: the code system predicted labels must belong to (invalid_code_rate counts those "
        "that do not). Unset: the target items' vocabulary in the contract, if any.",
    )
    tolerance: float = Field(
        default=0.0, ge=0, description="answer: number: an answer within this of the gold number counts as right."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        """A preset name is the preset; a mapping's unset keys take the preset's values, then the answer type's."""
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        preset = data.get("preset")
        merged = dict(tasks.PRESETS[preset]) if isinstance(preset, str) and preset in tasks.PRESETS else {}
        own = {k: v for k, v in data.items() if v is not None}
        if "user_prompt" in own and "plain_prompt" not in own:
            merged.pop("plain_prompt", None)  # a preset's plain prompt belongs with its own user prompt
        merged.update(own)
        answer = merged.get("answer")
        if preset is None and isinstance(answer, str):
            for key, value in tasks.ANSWER_DEFAULTS.get(answer, {}).items():
                merged.setdefault(key, value)
        return merged

    @model_validator(mode="after")
    def _complete(self) -> TaskSection:
        if self.answer is None:
            raise KeyProblems([("answer", "required: label, labels, json, text, number or chat (or set a preset)")])
        problems = [] if self.target is not None else [("target", "required: the row field that holds the answer")]
        if self.answer == "chat":
            own = {"system_prompt", "user_prompt", "plain_prompt", "parse_pattern"} & self.model_fields_set
            problems += [
                (
                    key,
                    "does not apply to answer chat: each conversation is sent as it is (its own system message; "
                    "its final assistant message is the answer); only metrics may be set besides preset: chat",
                )
                for key in sorted(own)
            ]
        elif self.user_prompt is None:
            problems.append(
                ("user_prompt", "required without a preset: a template over the row's fields, e.g. '{text}'")
            )
        parsers = tasks.ANSWER_PARSERS[self.answer]
        if self.parse is not None and self.parse not in parsers:
            problems.append(
                ("parse", f"{self.parse!r} does not read a {self.answer!r} answer; use {' or '.join(parsers)}")
            )
        if (self.parse or parsers[0]) == "regex":
            if not self.parse_pattern:
                problems.append(("parse_pattern", "parse: regex needs the pattern every label in an answer matches"))
            else:
                try:
                    re.compile(self.parse_pattern)
                except re.error as exc:
                    problems.append(("parse_pattern", f"not a regular expression: {exc}"))
        problems += self._metric_problems() + self._template_problems()
        if problems:
            raise KeyProblems(problems)
        if self.parse is None:
            object.__setattr__(self, "parse", parsers[0])
        if self.metrics is None:
            object.__setattr__(
                self, "metrics", [m for m in tasks.ANSWER_METRICS[self.answer] if not m.startswith("invalid_")]
            )
        return self

    def _metric_problems(self) -> list[tuple[str, str]]:
        assert self.answer is not None
        available, main = tasks.ANSWER_METRICS[self.answer], tasks.MAIN_METRIC_NAMES[self.answer]
        if self.metrics is None:
            return []
        if not self.metrics:
            return [("metrics", "list at least one metric (the first is the main one)")]
        problems = [
            (
                "metrics",
                f"{m!r} is not a metric of answer {self.answer!r}{did_you_mean(m, available)}; "
                f"available: {', '.join(available)}",
            )
            for m in self.metrics
            if m not in available
        ]
        if self.metrics[0] in available and self.metrics[0] not in main:
            problems.append(
                (
                    "metrics",
                    f"{self.metrics[0]!r} cannot come first: the main metric must be higher-is-better and add "
                    f"up over examples (the paired bootstrap); start with one of {', '.join(main)}",
                )
            )
        return problems

    def _template_problems(self) -> list[tuple[str, str]]:
        problems = []
        for key in ("system_prompt", "user_prompt", "plain_prompt"):
            template = getattr(self, key)
            if template is None:
                continue
            try:
                names = tasks.template_fields(template)
            except tasks.TemplateError as exc:
                problems.append((key, str(exc)))
                continue
            for name in names:
                applies = tasks.SPECIAL_PLACEHOLDERS.get(name)
                if applies is not None and self.answer not in applies:
                    problems.append((key, f"{{{name}}} applies to answer {' or '.join(applies)} only"))
                elif key == "system_prompt" and applies is None:
                    problems.append(
                        (key, f"{{{name}}}: the system prompt is the same for every row; put row fields in user_prompt")
                    )
        return problems

    @property
    def name(self) -> str:
        """The preset's name, or ``custom-<answer>`` for a task with no preset (run tags, the model card)."""
        return self.preset or f"custom-{self.answer}"

    @property
    def is_chat(self) -> bool:
        """Rows are whole conversations rendered through the base's chat template."""
        return self.answer == "chat"
