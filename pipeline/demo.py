"""Demo assets for the quickstart and the tests: synthetic coded notes and a tiny local Llama base.

Nothing is downloaded. The notes use real ICD-10-CM codes and phrasings derived from their official
descriptions; the base model is a 0.56M-parameter Llama whose byte-level BPE tokenizer is trained here with
``tokenizers`` and which is pre-trained briefly on the code descriptions ("E11.9 Type 2 diabetes mellitus
without complications"). It knows the vocabulary of coding but not the task, so the fine-tune has to
teach it to read a note and answer with codes: a base micro-F1 near 0 is the honest starting point.

Everything is deterministic for a given seed.

Run as:
    python scripts/make_demo_assets.py            # writes demo/medical_coding/ and demo/tiny-llama-icd10/
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import icd10cm, rundir
from pipeline.chat import content_text, prompt_text

# Common outpatient/inpatient codes (all billable in the current ICD-10-CM table; checked at build time).
DEMO_CODES = [
    "E11.9", "I10", "E78.5", "J44.9", "N18.30", "I48.91", "M54.50", "F32.A", "Z79.4", "U07.1",
    "S93.401A", "E03.9", "K21.9", "J45.909", "E66.9", "F41.9", "G47.33", "I25.10", "I50.9", "N39.0",
    "J18.9", "M17.9", "E55.9", "D64.9", "K59.00", "R51.9", "G43.909", "F17.210", "E11.65", "E11.22",
    "I63.9", "J06.9", "R05.9", "M79.7", "L40.0", "K57.30", "N40.0", "E87.1", "R73.03", "Z23",
    "M81.0", "I73.9", "F03.90", "J30.9", "H10.9", "B34.9", "R10.9", "R42", "R53.83", "E86.0",
    "K76.0", "M10.9", "N17.9", "I21.9", "D50.9", "E04.2", "G89.29", "F10.20", "Z87.891", "M54.2",
]  # fmt: skip

# Clinical shorthand: (phrase in a cleaned description, abbreviation a clinician would write).
ABBREVIATIONS = [
    ("type 2 diabetes mellitus", "T2DM"), ("essential hypertension", "HTN"), ("hyperlipidemia", "HLD"),
    ("chronic obstructive pulmonary disease", "COPD"), ("chronic kidney disease", "CKD"),
    ("atrial fibrillation", "afib"), ("gastro-esophageal reflux disease", "GERD"),
    ("heart failure", "CHF"), ("urinary tract infection", "UTI"), ("obstructive sleep apnea", "OSA"),
    ("major depressive disorder", "MDD"), ("benign prostatic hyperplasia", "BPH"),
    ("acute kidney failure", "AKI"), ("myocardial infarction", "MI"), ("cerebral infarction", "CVA"),
    ("upper respiratory infection", "URI"), ("peripheral vascular disease", "PVD"),
    ("nicotine dependence, cigarettes", "tobacco use disorder, cigarettes"), ("osteoarthritis", "OA"),
    ("low back pain", "LBP"), ("iron deficiency anemia", "IDA"), ("fatty liver", "NAFLD"),
]  # fmt: skip

TEMPLATES = [
    "Assessment: {p}.", "Pt with h/o {p}.", "Known {p}, stable on current regimen.",
    "Presents today for follow-up of {p}.", "Dx: {p}.", "History significant for {p}.",
    "Plan: continue management of {p}.", "Also noted: {p}.", "Findings consistent with {p}.",
    "Problem list includes {p}.", "Seen for {p}; symptoms reviewed.", "Impression: {p}.",
    "Patient reports ongoing {p}.",
]  # fmt: skip

DISTRACTORS = [
    "Vitals within normal limits.", "Denies chest pain or shortness of breath.", "Follow up in 3 months.",
    "No known drug allergies.", "Labs reviewed with patient.", "Medication list reconciled.",
    "Counseled on diet and exercise.", "Lives with spouse, independent in ADLs.", "Afebrile, well appearing.",
    "Return precautions discussed.", "Lungs clear to auscultation bilaterally.", "Alert and oriented x3.",
    "Family history noncontributory.", "Will recheck at next visit.", "Tolerating diet, ambulating.",
]  # fmt: skip

OPENINGS = ["{age}yo {sex}.", "{age} y/o {sex}.", "Pt {age}{s}."]

# The chat template of the demo chat base (ChatML turns, Hermes-style tool calls): it renders system, user,
# assistant, tool turns and tool definitions, each turn closed by <|im_end|> (the end-of-turn and EOS token).
# An assistant's tool calls render as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, the form
# pipeline.chat parses back; tool results as <tool_response>...</tool_response>.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- if tools -%}\n"
    "<|im_start|>tools\n"
    "{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}<|im_end|>\n"
    "{% endif -%}\n"
    "{%- for message in messages -%}\n"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.role == 'tool' %}<tool_response>{{ message.content }}</tool_response>{% else %}"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    '<tool_call>{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments }}}</tool_call>'
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif -%}\n"
)


def phrasings(code: str) -> list[str]:
    """Ways a clinician writes the diagnosis of ``code``, derived from its official description."""
    text = icd10cm.description(code).lower()
    text = re.sub(r"\s*\([^)]*\)", "", text)  # "essential (primary) hypertension" -> "essential hypertension"
    text = re.sub(r"\s+", " ", text).strip()
    out = [text]
    if text.endswith(", unspecified"):
        core = text[: -len(", unspecified")]
        out += [core, f"{core} NOS", f"unspecified {core}"]
    elif ", unspecified" in text:
        out.append(text.replace(", unspecified", ""))
    for phrase, short in ABBREVIATIONS:
        for variant in list(out):
            if phrase in variant:
                out.append(variant.replace(phrase, short))
    return list(dict.fromkeys(out))


def make_note(rng: random.Random, codes: list[str], table: dict[str, list[str]]) -> dict[str, Any]:
    """One synthetic note: a short opening, 1-3 coded sentences and 1-3 distractors, codes in order of mention.

    Notes are kept short (~40 tokens) on purpose: the quickstart trains on a 2-core CPU.
    """
    num_codes = rng.choices([1, 2, 3], weights=[35, 40, 25])[0]
    chosen = rng.sample(codes, num_codes)
    sentences = [rng.choice(TEMPLATES).format(p=rng.choice(table[c])) for c in chosen]
    for _ in range(rng.randint(1, 3)):
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(DISTRACTORS))
    sex = rng.choice(["male", "female"])
    opening = rng.choice(OPENINGS).format(age=rng.randint(18, 92), sex=sex, s=sex[0].upper())
    return {"note": " ".join([opening, *sentences]), "codes": chosen}


def build_demo_dataset(
    out_dir: str | Path, num_train: int = 2000, num_eval: int = 200, seed: int = 0, num_codes: int = 40
) -> Path:
    """Write ``train.jsonl`` and ``eval.jsonl`` of synthetic coded notes to ``out_dir``.

    Uses the first ``num_codes`` of ``DEMO_CODES``. No note text appears in both splits (a duplicate would
    inflate the eval score).
    """
    codes = [c for c in DEMO_CODES[:num_codes] if icd10cm.status(c) == "billable"]
    if len(codes) < num_codes:
        raise RuntimeError(f"only {len(codes)} of {num_codes} demo codes are billable in this ICD-10-CM table")
    table = {c: phrasings(c) for c in codes}
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for split, count in (("train", num_train), ("eval", num_eval)):
        while len(splits[split]) < count:
            row = make_note(rng, codes, table)
            if row["note"] in seen:
                continue
            seen.add(row["note"])
            splits[split].append({"id": f"{split}-{len(splits[split]):06d}", **row})
    out = Path(out_dir)
    for split, rows in splits.items():
        rundir.write_jsonl(out / f"{split}.jsonl", rows)
    return out


# --------------------------------------------------------------------------------------------------
# Support-desk routing in OpenAI's chat format (the migration demo): JSON answers, multi-turn rows with a
# weight-0 clarifying turn, and tool-call rows. Keywords in a ticket decide its queue and priority, so a
# tiny model can learn the task; the wording is drawn from templates, so eval tickets are new sentences.

SUPPORT_SYSTEM = "Route the ticket: answer with JSON (queue, priority); look up an order number first."
SUPPORT_ISSUES = {
    "billing": ["I was charged twice for my plan", "my invoice shows the wrong amount", "the card payment failed",
                "I want a refund of the extra fee", "my subscription price went up"],
    "shipping": ["my package has not arrived", "the tracking page shows no update", "the courier lost my parcel",
                 "delivery was sent to the wrong address", "the box arrived damaged in transit"],
    "technical": ["the app crashes on start", "I get an error code when I log in to the app", "the sync is broken",
                  "the website page will not load", "the export button does nothing"],
    "account": ["I cannot reset my password", "my account is locked", "I want to change my email address",
                "please delete my account", "two factor codes do not arrive"],
    "returns": ["I want to return the shoes", "the jacket is the wrong size", "how do I send back this item",
                "I need an exchange for a different color", "the return label does not work"],
}  # fmt: skip
SUPPORT_PRIORITY = {
    "urgent": ["I need this fixed today", "this is urgent", "please help immediately"],
    "high": ["this is the second time", "I am very unhappy", "this keeps happening"],
    "low": ["no rush", "whenever you can", "just a question"],
    "normal": ["thanks", "can you help", "please advise"],
}
SUPPORT_OPENERS = ["Hi,", "Hello,", "Hey team,", "Good morning,", "Dear support,", ""]
SUPPORT_PRODUCTS = ["laptop", "phone", "headphones", "coffee maker", "desk lamp", "backpack", "printer", "camera",
                    "watch", "speaker", "keyboard", "monitor"]  # fmt: skip
SUPPORT_CONTEXT = ["since {day}", "on my {product}", "for the {product} I bought on {day}", "about the {product}",
                   "again this {day}", "with my {product} order"]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ORDER_STATUS = {"lost": ("shipping", "high"), "delayed": ("shipping", "normal"), "delivered": ("returns", "low")}
LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}},
    },
}


def _answer(queue: str, priority: str) -> str:
    return json.dumps({"queue": queue, "priority": priority})


def make_support_row(rng: random.Random, kind: str) -> dict[str, Any]:
    """One conversation: single, multi (a weight-0 clarifying turn), tool, or tool_call (it ends at the call)."""
    system = {"role": "system", "content": SUPPORT_SYSTEM}
    queue = rng.choice(list(SUPPORT_ISSUES))
    priority = rng.choice(list(SUPPORT_PRIORITY))
    context = rng.choice(SUPPORT_CONTEXT).format(day=rng.choice(DAYS), product=rng.choice(SUPPORT_PRODUCTS))
    ticket = " ".join(
        p for p in (rng.choice(SUPPORT_OPENERS), f"{rng.choice(SUPPORT_ISSUES[queue])} {context},",
                    rng.choice(SUPPORT_PRIORITY[priority]) + ".") if p
    )  # fmt: skip
    if kind == "single":
        return {"messages": [system, {"role": "user", "content": ticket},
                             {"role": "assistant", "content": _answer(queue, priority)}]}  # fmt: skip
    if kind == "multi":
        return {
            "messages": [
                system,
                {
                    "role": "user",
                    "content": rng.choice(["Hi, I have a problem.", "Something is wrong.", "Help please."]),
                },
                {"role": "assistant", "content": "Could you tell me more about the problem?", "weight": 0},
                {"role": "user", "content": ticket},
                {"role": "assistant", "content": _answer(queue, priority)},
            ]
        }
    order_id = rng.randint(100, 999)
    status = rng.choice(list(ORDER_STATUS))
    call_id = f"call_{rng.randint(1000, 9999)}"
    call = {"id": call_id, "type": "function",
            "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": order_id})}}  # fmt: skip
    product = rng.choice(SUPPORT_PRODUCTS)
    asked = rng.choice(["where is my order {n}?", "any news on order {n} ({p})?", "order {n} with my {p}: status?",
                        "can you check order {n}, the {p}?"]).format(n=order_id, p=product)  # fmt: skip
    user = {"role": "user", "content": f"{rng.choice(SUPPORT_OPENERS)} {asked}".strip()}
    messages = [system, user, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "tool":
        messages += [
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"order_id": order_id, "status": status})},
            {"role": "assistant", "content": _answer(*ORDER_STATUS[status])},
        ]
    return {"messages": messages, "tools": [LOOKUP_ORDER]}


def build_chat_demo_dataset(out_dir: str | Path, num_train: int = 1200, num_eval: int = 200, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``eval.jsonl`` of support-desk conversations in OpenAI's format.

    Kinds: 45% single-turn, 25% multi-turn with a weight-0 turn, 15% tool call then answer, 15% ending at the
    tool call. A conversation whose prompt repeats an earlier one is redrawn, so the contract's duplicate and
    check has nothing to take out (near duplicates of a template-made set remain possible and are reported).
    """
    rng = random.Random(seed)
    kinds = ["single"] * 9 + ["multi"] * 5 + ["tool"] * 3 + ["tool_call"] * 3
    seen: set[str] = set()

    def draw(count: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while len(rows) < count:
            row = make_support_row(rng, rng.choice(kinds))
            text = prompt_text(row)
            if text not in seen:
                seen.add(text)
                rows.append(row)
        return rows

    train, evaluation = draw(num_train), draw(num_eval)
    out = Path(out_dir)
    rundir.write_jsonl(out / "train.jsonl", train)
    rundir.write_jsonl(out / "eval.jsonl", evaluation)
    return out


# --------------------------------------------------------------------------------------------------
# Tiny base model


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and pre-training budget of the demo base. Widths must be multiples of 64 (bitsandbytes on CPU)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    pretrain_steps: int = 150
    pretrain_batch_size: int = 32
    pretrain_block_size: int = 128
    pretrain_learning_rate: float = 3e-3
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int, chat: bool = False) -> Any:
    """A byte-level BPE tokenizer (Llama-3 style: BOS added, EOS closes a completion) as a transformers tokenizer.

    ``chat``: with the ChatML turn tokens and ``CHAT_TEMPLATE``; ``<|im_end|>`` is then the EOS (end of turn).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", *(["<|im_start|>", "<|im_end|>"] if chat else [])]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    eos = "<|im_end|>" if chat else "</s>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_base(
    out_dir: str | Path,
    extra_texts: list[str] | None = None,
    spec: TinyModelSpec = TinyModelSpec(),
    *,
    corpus: list[str] | None = None,
    chat: bool = False,
) -> Path:
    """Train a tokenizer, build a tiny Llama and pre-train it on ICD-10-CM "code description" lines.

    Args:
        out_dir: Where the model directory (safetensors, config, tokenizer) is written.
        extra_texts: More text for the tokenizer (e.g. the training notes), so notes tokenize compactly.
        spec: Shape and pre-training budget; ``pretrain_steps=0`` leaves random weights (fast tests).
        corpus: Pre-training text instead of the code descriptions.
        chat: A chat base: ChatML turn tokens, ``CHAT_TEMPLATE``, ``<|im_end|>`` as EOS (``train_tokenizer``).

    Returns:
        The model directory.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    if corpus is None:
        corpus = [f"{code} {icd10cm.description(code)}" for code in icd10cm.billable_codes()]
    tokenizer = train_tokenizer(corpus + list(extra_texts or []), spec.vocab_size, chat=chat)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if spec.pretrain_steps:
        _pretrain(model, tokenizer, corpus, spec)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rundir.write_json(out / "demo_spec.json", spec.__dict__)
    return out


def _pretrain(model: Any, tokenizer: Any, corpus: list[str], spec: TinyModelSpec) -> None:
    """Next-token pre-training on the description lines, packed into fixed blocks of tokens."""
    import torch

    rng = random.Random(spec.seed)
    lines = corpus[:]
    rng.shuffle(lines)
    block = spec.pretrain_block_size
    # Encode only as many lines as the steps will read (each step reads batch x block tokens).
    needed = spec.pretrain_steps * spec.pretrain_batch_size * block
    ids: list[int] = []
    for start in range(0, len(lines), 4096):
        for encoded in tokenizer(lines[start : start + 4096], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded + [tokenizer.eos_token_id])
        if len(ids) >= needed:
            break
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_learning_rate, weight_decay=0.0)
    warmup = max(1, spec.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(blocks), generator=generator)
    model.train()
    start = time.time()
    for step in range(spec.pretrain_steps):
        index = order[(torch.arange(spec.pretrain_batch_size) + step * spec.pretrain_batch_size) % len(blocks)]
        batch = blocks[index]
        # fp32 on purpose: bf16 autocast was 2x faster on one CPU with avx512_bf16 and 17x slower on another.
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == spec.pretrain_steps:
            print(
                f"  pre-train step {step + 1}/{spec.pretrain_steps}  loss {loss.item():.3f}  "
                f"({time.time() - start:.0f}s)",
                flush=True,
            )
    model.eval()


def build_demo_assets(root: str | Path = "demo", *, force: bool = False, chat: bool = False) -> dict[str, Path]:
    """Build the quickstart's data and base model under ``root`` unless they are already there.

    ``chat``: also the OpenAI migration quickstart's support-desk conversations and tiny chat base (~30 s more).
    """
    root = Path(root)
    data_dir, model_dir = root / "medical_coding", root / "tiny-llama-icd10"
    if force or not (data_dir / "eval.jsonl").is_file():
        print(f"Building demo notes -> {data_dir}")
        build_demo_dataset(data_dir)
    if force or not (model_dir / "model.safetensors").is_file():
        print(f"Building tiny base model (tokenizer + pre-training on ICD-10-CM descriptions) -> {model_dir}")
        notes = [json.loads(line)["note"] for line in (data_dir / "train.jsonl").read_text().splitlines()]
        build_tiny_base(model_dir, extra_texts=notes)
    chat_data, chat_model = root / "support_desk", root / "tiny-llama-chat"
    if not chat:
        return {"data": data_dir, "model": model_dir}
    if force or not (chat_data / "eval.jsonl").is_file():
        print(f"Building demo support-desk conversations (OpenAI chat format) -> {chat_data}")
        build_chat_demo_dataset(chat_data)
    if force or not (chat_model / "model.safetensors").is_file():
        print(f"Building tiny chat base model (ChatML template with tools) -> {chat_model}")
        build_tiny_chat_base(chat_model, chat_data)
    return {"data": data_dir, "model": model_dir, "chat_data": chat_data, "chat_model": chat_model}


CHAT_SPEC = TinyModelSpec(vocab_size=512, pretrain_steps=60)


def build_tiny_chat_base(out_dir: str | Path, data_dir: str | Path, spec: TinyModelSpec = CHAT_SPEC) -> Path:
    """The demo chat base: tokenizer and brief pre-training on the tickets' text, never on the answers.

    It learns the words of support tickets, not how to route them: the base's exact match stays near 0.
    """
    texts = []
    for line in (Path(data_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [content_text(m.get("content")) or "" for m in row["messages"] if m["role"] in ("system", "user")]
    answers = [_answer(q, p) for q in SUPPORT_ISSUES for p in SUPPORT_PRIORITY]  # tokenizer only: compact JSON
    return build_tiny_base(out_dir, extra_texts=answers, spec=spec, corpus=texts, chat=True)
