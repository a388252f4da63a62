"""The command line's arguments: one sub-parser per command (``cli`` maps each command to its handler).

Kept apart from ``cli`` so the parser can be read (and inspected by tests and docs) without the handlers, and
each stays a readable size. Light: argparse and the launch options only.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import __version__
from pipeline.launch import add_arguments as launch_args


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/medical_coding.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), validated like the file: --set training.learning_rate=1e-4",
    )
    parser.add_argument("--run-dir", help="output directory (default: runs/<recipe-name>/<run-id>/)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: ``args.command`` names the command (``cli.HANDLERS`` maps it to its handler)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="QLoRA fine-tuning on private data, driven by one YAML recipe. Offline by default.",
        epilog="Run a command with --help for its options. Exit codes: 0 ok, 1 the job failed, 2 bad request.",
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _recipe_commands(commands)
    _run_commands(commands)
    _data_commands(commands)
    return parser


def _recipe_commands(commands: Any) -> None:
    """The commands that take a recipe: validate, plan, train, evaluate."""
    p = commands.add_parser(
        "validate", help="check the recipe, its task, the tokenizer and the data against its contract (no weights)"
    )
    _recipe_args(p)
    p.add_argument(
        "--data-only",
        action="store_true",
        help="check the data without the base (a laptop checking data for a big model): no tokenizer needed, "
        "token-length and chat-template checks skipped with a warning",
    )

    p = commands.add_parser("plan", help="print the derived numbers: batch, steps, tokens, parameters (no weights)")
    _recipe_args(p)
    p.add_argument(
        "--exact",
        action="store_true",
        help="count parameters on the meta device with transformers and peft (any architecture; imports torch)",
    )

    p = commands.add_parser("train", help="validate, train the adapter, evaluate, and log everything to MLflow")
    _recipe_args(p)
    p.add_argument("--force", action="store_true", help="train even if the plan says it does not fit the GPU")
    launch_args(p)

    p = commands.add_parser(
        "evaluate", help="re-score a run: base, fine-tune and the commercial baseline, with a CI and cost"
    )
    _recipe_args(p)
    p.add_argument("--run", help="the run: its directory (runs/<name>/<run-id>) or its MLflow run id")
    p.add_argument(
        "--systems",
        help="comma-separated systems to score: base,finetuned,baseline (default: the recipe's eval.systems if "
        "set, else base,finetuned plus baseline when the recipe has one); generations already in the run are reused",
    )


def _run_commands(commands: Any) -> None:
    """The commands on runs, their store and the audit log: sync, audit, ui, export, promote, runs."""
    p = commands.add_parser("sync", help="upload what a run kept locally while the tracking server was down")
    p.add_argument("run_dir", help="run directory with tracking/pending.jsonl")
    p.add_argument("--uri", help="tracking store to upload to (default: the run's own; MLFLOW_TRACKING_URI wins)")

    p = commands.add_parser("audit", help="check the hash-chained audit log of every command")
    p.add_argument("action", choices=["verify"], help="verify: detect edited, removed or reordered entries")
    p.add_argument("--log", help="audit log (default: $PIPELINE_AUDIT_LOG or runs/audit.jsonl)")

    p = commands.add_parser("ui", help="open the MLflow UI for the recipe's (or the default) store on 127.0.0.1")
    p.add_argument("recipe", nargs="?", help="recipe whose tracking.uri to show (default: sqlite:///mlruns.db)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="loopback address to bind (default 127.0.0.1); the UI is never exposed to the network, "
        "see docs/architecture.md for a shared, authenticated server",
    )

    p = commands.add_parser(
        "export", help="export a run: the adapter (PEFT format), and with --merge verified merged weights + model card"
    )
    p.add_argument("run", help="run directory (runs/<name>/<id>/) or MLflow run id")
    p.add_argument("--merge", action="store_true", help="also merge the adapter into the base, one shard at a time")
    p.add_argument("--out", help="output directory (default: RUN/export)")
    p.add_argument(
        "--merge-base",
        choices=["dequantized", "original"],
        help="merge into dequant(NF4(W)) (what was trained and evaluated) or the original 16-bit weights "
        "(default: the recipe's export.merge_base)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the run's resolved recipe, e.g. --set model.license_accepted=true",
    )
    p.add_argument(
        "--register",
        action="store_true",
        help="with --merge: upload the merged model to MLflow and register it (only when it passed verification)",
    )
    p.add_argument("--tracking-uri", help="MLflow store of an MLflow run id (default MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--recipe",
        dest="store_recipe",
        metavar="RECIPE",
        help="for an MLflow run id in a remote store: the recipe whose tracking.uri is the store and whose "
        "privacy.allowed_hosts allow it (a run id is looked up before the run's own recipe is known)",
    )
    p.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="allow this host for the command, as a privacy.allowed_hosts entry (name, IP or CIDR network)",
    )

    p = commands.add_parser(
        "promote", help="point a registry alias (champion) at a run's adapter version; refused if it lost"
    )
    p.add_argument("run", help="run directory (runs/<name>/<id>/) or MLflow run id")
    p.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    p.add_argument("--tracking-uri", help="MLflow store of an MLflow run id (default MLFLOW_TRACKING_URI)")

    p = commands.add_parser("runs", help="list tracked runs: each system's main metric and the verdict vs baseline")
    p.add_argument("recipe", nargs="?", help="recipe whose store and experiment to list (default: every experiment)")
    p.add_argument("--limit", type=int, default=20, help="newest N runs (default 20)")


def _data_commands(commands: Any) -> None:
    """The commands on data files: split, init."""
    p = commands.add_parser(
        "split", help="split one data file into train and eval with no leakage (copies stay on one side)"
    )
    p.add_argument("file", help="the data file (JSONL, CSV or Parquet), e.g. an OpenAI training file")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of rows for eval (default 0.1)")
    p.add_argument("--out", required=True, help="directory for train.<ext>, eval.<ext> and split_manifest.json")
    p.add_argument("--seed", type=int, default=0, help="which groups go to eval (default 0): same seed, same split")
    p.add_argument(
        "--contract",
        help="contract whose dataset.text_fields and near-duplicate threshold define a copy (default: inferred "
        "from the rows: a chat conversation before its final answer, else the 'note' or 'text' field)",
    )
    p.add_argument(
        "--text-field", dest="text_fields", action="append", metavar="FIELD", help="field to compare (repeatable)"
    )
    p.add_argument("--force", action="store_true", help="replace splits already in --out")

    p = commands.add_parser(
        "init", help="write a data contract and a recipe inferred from one data file, split it, and validate"
    )
    p.add_argument("file", help="the data file: JSON Lines, CSV or Parquet (an OpenAI chat file is recognised)")
    p.add_argument(
        "--target",
        help="the field holding the answer (default: one named label, labels, category, class, codes, "
        "answer, output, summary, fields or target)",
    )
    p.add_argument(
        "--answer",
        choices=["label", "labels", "json", "text", "number"],
        help="what the answer is (default: inferred: a list -> labels, an object -> json, a number -> number, a "
        "string with few distinct values -> label, else text)",
    )
    p.add_argument("--name", help="recipe, contract and data directory name (default: the file's stem)")
    p.add_argument("--eval", dest="eval_file", metavar="FILE", help="an eval file of its own (default: split FILE)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of rows split off for eval (default 0.1)")
    p.add_argument(
        "--base",
        choices=["quickstart", "production"],
        default="quickstart",
        help="the recipe to extend: quickstart (the tiny demo base on a CPU, default) or production (Llama-3.3-70B "
        "on one 80 GB GPU); a chat file gets the OpenAI migration recipes",
    )
    p.add_argument("--force", action="store_true", help="replace files init wrote before (never without it)")
