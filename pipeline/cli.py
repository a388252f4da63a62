"""``python -m pipeline``: the commands, one YAML recipe each.

* ``validate``: check the recipe and the data against its contract (no model); writes ``validation/``.
* ``plan``: the derived numbers (batch, steps, tokens, parameters, memory) without loading weights.
* ``train``: validate, train the adapter, evaluate, log to MLflow; several GPUs or nodes through torchrun.
* ``evaluate``: re-score a run (base, fine-tune, the commercial baseline) with a CI and the cost.
* ``sync``: upload what a run kept locally while the tracking server was down.
* ``audit``: verify the hash-chained audit log that every command appends to.
* ``ui``: the MLflow UI for the recipe's (or the default) store, on loopback only.
* ``export``: the adapter (PEFT format), and with ``--merge`` verified merged weights and a model card.
* ``runs``: tracked runs, each system's main metric and the verdict against the baseline.
* ``promote``: point a registry alias (``champion``) at a run's adapter version, refused if it lost.
* ``split``: one data file into train and eval with no leakage between them, and a manifest.
* ``init``: a data contract and a recipe inferred from one data file (split for eval), then ``validate`` on them.

Exit codes: 0 success; 1 the job ran and failed (``errors.JobFailed``: a contract broken, training or
evaluation failed); 2 the request itself is wrong (``errors.UsageError``: recipe, arguments, a missing file or
model). ``main`` maps them, and file-system errors, in one place; any other exception is a bug and keeps its
traceback. Each command fills an ``Outcome`` that ``main`` creates and passes it: what the command touched,
for its audit entry, also when it fails midway.

Stage modules are imported inside each handler, so ``--help`` and ``validate`` never load torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli_args import build_parser
from pipeline.errors import JobFailed, UsageError
from pipeline.os_errors import describe_os_error, wrapped_os_error

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass
class Outcome:
    """What one command touched, for its audit entry: created by ``main``, filled by the command's handler.

    Facts are set as soon as they are known (the recipe once loaded, the run directory once created), so the
    entry of a command that fails midway still records them.
    """

    output_roots: list[str] = field(default_factory=list)  # --run-dir, --out: where this command writes
    recipe_path: str | None = None
    recipe_sha256: str | None = None
    recipe: Any = None  # pipeline.recipe.Recipe: its data files are hashed for the entry
    inputs_run_dir: Path | None = None  # the run whose validation report holds the input hashes (default run_dir)
    run_dir: Path | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    license_acknowledged: Any = None
    promotion: dict[str, Any] | None = None  # promote: which alias moved to which version, from which
    recipe_label: str | None = None  # the recipe the errors in ``names_recipe`` are about
    names_recipe: tuple[type[BaseException], ...] = ()

    def update(self, **facts: Any) -> None:
        """Set known facts by name (``train``'s ``on_start`` calls it with run_dir, mlflow_run_id, tracking_uri)."""
        for key, value in facts.items():
            if not hasattr(self, key):
                raise TypeError(f"Outcome has no field {key!r}")
            setattr(self, key, value)

    def name_recipe(self, label: str, *errors: type[BaseException]) -> None:
        """From now on, an error of one of these types is printed after ``label`` (the recipe it is about)."""
        self.recipe_label, self.names_recipe = label, errors

    def error_lines(self, exc: UsageError | JobFailed) -> list[str]:
        """The ``error:`` lines for a project error: its own, the first after the recipe when it is about it."""
        lines = exc.lines()
        if self.recipe_label and lines and isinstance(exc, self.names_recipe):
            return [f"{self.recipe_label}: {lines[0]}", *lines[1:]]
        return lines


class AuditChainBroken(JobFailed):
    """The audit log was edited, truncated or reordered: one ``error:`` line per finding."""

    def __init__(self, findings: list[str]) -> None:
        super().__init__("\n".join(findings))
        self.findings = list(findings)

    def lines(self) -> list[str]:
        """One line per finding of ``audit.verify``."""
        return self.findings


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. Every command that runs is appended to the audit log.

    Each handler is called as ``handler(args, outcome)`` and returns the exit code; a project error it raises
    is printed here (``error:`` lines) and gives its own exit code.
    """
    from pipeline.egress import install_egress_guard, offline_environment

    offline_environment()  # before any library that could reach the network is imported
    guard = install_egress_guard(())  # loopback only until a recipe allows more
    parser = build_parser()
    args = parser.parse_args(argv)
    outcome = Outcome(output_roots=[p for p in (getattr(args, "run_dir", None), getattr(args, "out", None)) if p])
    if _rank() > 0:
        # A worker of a multi-process launch: rank 0 prints and records; the others would only repeat it.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    code = EXIT_FAILED
    try:
        code = HANDLERS[args.command](args, outcome)
    except (UsageError, JobFailed) as exc:
        for line in outcome.error_lines(exc):
            print(f"error: {line}", file=sys.stderr)
        code = exc.exit_code
    except OSError as exc:
        # Disk full, a read-only or foreign-owned output directory: one line naming the file, not a traceback.
        # Outputs are written to a temporary file and renamed (rundir.write_text), so what was already
        # written is intact; the message says so.
        code = _print_os_error(exc, outcome)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - only a write failure that a library wrapped is handled here
        failure = wrapped_os_error(exc)
        if failure is None:
            raise  # a bug: the traceback is what its report needs
        code = _print_os_error(failure, outcome)
    finally:
        if _rank() == 0:
            _audit(args, outcome, code, guard)
    return code


def _print_os_error(exc: OSError, outcome: Outcome) -> int:
    message, code = describe_os_error(exc, run_dir=outcome.run_dir, output_roots=outcome.output_roots)
    print(f"error: {message}", file=sys.stderr)
    return code


def audit_log_path() -> Path:
    """The audit log: $PIPELINE_AUDIT_LOG, else runs/audit.jsonl in the working directory."""
    import os

    from pipeline.audit import DEFAULT_LOG

    return Path(os.environ.get("PIPELINE_AUDIT_LOG") or DEFAULT_LOG)


def _audit(args: argparse.Namespace, outcome: Outcome, code: int, guard) -> None:  # noqa: ANN001 - EgressGuard
    from pipeline import audit
    from pipeline.egress import redact_secrets

    run_dir = outcome.run_dir
    inputs_run_dir = outcome.inputs_run_dir if outcome.inputs_run_dir is not None else run_dir
    record = {
        "command": args.command,
        # A password typed into a URL (--set tracking.uri=..., --tracking-uri, sync --uri) is masked.
        "argv": [redact_secrets(a) for a in sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        "exit_code": code,
        "recipe": outcome.recipe_path,
        "recipe_sha256": outcome.recipe_sha256,
        "inputs": _input_hashes(outcome.recipe, inputs_run_dir),
        "run_dir": str(run_dir) if run_dir else None,
        "outputs": audit.hash_outputs(Path(run_dir)) if run_dir else {},
        "egress": guard.decisions,
        "mlflow_run_id": outcome.mlflow_run_id,
        "license_acknowledged": outcome.license_acknowledged,
        **({"promotion": outcome.promotion} if outcome.promotion else {}),
    }
    try:
        entry = audit.append(audit_log_path(), record)
    except audit.AuditLogCorrupt as exc:  # the command ran; it must not end in a traceback over the log
        print(f"warning: this command was not added to the audit log: {exc}", file=sys.stderr)
        return
    except OSError as exc:
        print(f"warning: could not append to the audit log {audit_log_path()}: {exc}", file=sys.stderr)
        return
    from pipeline.tracking import annotate_run, queue_annotation

    tags = {"audit.entry_hash": entry["hash"], "audit.entry_seq": str(entry["seq"])}
    failure = None
    if outcome.mlflow_run_id and outcome.tracking_uri:
        try:
            annotate_run(outcome.tracking_uri, outcome.mlflow_run_id, tags, files=[audit_log_path()])
            return
        except Exception as exc:  # noqa: BLE001 - the entry is safe in the log; MLflow is a copy
            failure = type(exc).__name__
    # A run kept offline (its store was down) gets the entry in its queue, so `sync` uploads it with the rest
    # (export's: in the exported run's queue, where its other MLflow calls went).
    if inputs_run_dir is not None and queue_annotation(Path(inputs_run_dir), tags, [audit_log_path()]):
        if failure:
            print(f"warning: MLflow is unreachable ({failure}); the audit entry is queued for sync", file=sys.stderr)
        return
    if failure:
        print(
            f"warning: could not attach the audit entry to MLflow run {outcome.mlflow_run_id}: {failure}",
            file=sys.stderr,
        )


def _load(args: argparse.Namespace, outcome: Outcome):  # noqa: ANN202 - returns pipeline.recipe.Recipe
    from pipeline.egress import install_egress_guard
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    install_egress_guard(recipe.privacy.allowed_hosts)
    outcome.update(recipe_path=args.recipe, recipe_sha256=_sha256_text(recipe.to_yaml()), recipe=recipe)
    return recipe


def _load_run_recipe(  # noqa: ANN202 - Recipe | None
    run_dir: Path, outcome: Outcome, overrides: list[str] | tuple[str, ...] = (), extra_hosts: tuple[str, ...] = ()
):
    """The recipe a run was made with (``RUN/recipe.resolved.yaml``): its allow-list guards this command.

    ``sync`` and ``export`` take a run, not a recipe; without this the tracking server the run was allowed to
    reach would be refused when its queue is uploaded or its export attached. The recipe, its hash and its
    input hashes also go in the command's audit entry. None when the run has no resolved recipe. ``extra_hosts``
    (``export --recipe``/``--allowed-host``) stay allowed beside the run's own.
    """
    from pipeline.egress import install_egress_guard
    from pipeline.recipe import load_recipe

    resolved = Path(run_dir) / "recipe.resolved.yaml"
    if not resolved.is_file():
        return None
    recipe = load_recipe(resolved, overrides)
    install_egress_guard(tuple(dict.fromkeys([*extra_hosts, *recipe.privacy.allowed_hosts])))
    outcome.update(
        recipe_path=str(resolved),
        recipe_sha256=_sha256_text(recipe.to_yaml()),
        recipe=recipe,
        inputs_run_dir=Path(run_dir),
    )
    return recipe


def cmd_validate(args: argparse.Namespace, outcome: Outcome) -> int:
    """Recipe schema, input files, and every row against the contract; writes validation/ in the run dir."""
    from pipeline import rundir
    from pipeline.data import validate_data
    from pipeline.model import tokenizer_or_reason

    recipe = _load(args, outcome)
    out = rundir.new_run_dir(recipe.name, args.run_dir)
    outcome.run_dir = out
    rundir.write_text(out / "recipe.resolved.yaml", recipe.to_yaml())
    # keep_rows=False: only the reports, not the rows
    validate_data(recipe, out, tokenizer_or_reason, args.recipe, keep_rows=False, require_tokenizer=not args.data_only)
    _warn_refused_hosts(recipe, args.recipe)
    print(f"Recipe {args.recipe} is valid; data meets the contract. Reports: {out / 'validation'}")
    return EXIT_OK


def _warn_refused_hosts(recipe, source: str) -> None:  # noqa: ANN001 - pipeline.recipe.Recipe
    """Every host the recipe names that the egress guard would refuse: the key, the host, the line that allows it."""
    from pipeline.baseline import DEFAULT_BASE_URL
    from pipeline.egress import refused_destinations

    destinations = []
    if recipe.tracking.enabled and recipe.tracking.uri:
        destinations.append(("tracking.uri", recipe.tracking.uri))
    for key, section in (("baseline", recipe.baseline), ("judge", recipe.judge)):
        if section is not None and section.send_data:  # nothing is sent otherwise
            url = section.base_url or DEFAULT_BASE_URL.get(section.provider, "")
            destinations.append((f"{key}.base_url", url))
    for line in refused_destinations(destinations, recipe.privacy.allowed_hosts):
        print(f"warning: {source}: {line}", file=sys.stderr)


def cmd_plan(args: argparse.Namespace, outcome: Outcome) -> int:
    """Derived numbers from the recipe, the base's config.json and the train file's row count."""
    from pipeline import rundir
    from pipeline.plan import find_model_config, make_plan, render_plan

    recipe = _load(args, outcome)
    if Path(recipe.data.contract).is_file():  # the task against the contract's fields, as validate checks it
        from pipeline.contracts import load_contract
        from pipeline.data import task_problems
        from pipeline.recipe import RecipeError

        problems = task_problems(recipe, load_contract(recipe.data.contract), args.recipe)
        if problems:
            raise RecipeError(problems)
    train_file = Path(recipe.data.train)
    rows = _count_lines(train_file) if train_file.is_file() else 0
    config, source = find_model_config(recipe.model.path)
    model_dir = recipe.model.path if Path(recipe.model.path).is_dir() else None
    plan = make_plan(recipe, rows, config, exact=args.exact, model_dir=model_dir)
    print(render_plan(plan, source))
    _warn_refused_hosts(recipe, args.recipe)
    if recipe.task.is_chat:
        from pipeline.data import check_tool_rendering
        from pipeline.model import tokenizer_or_reason

        tokenizer, why = tokenizer_or_reason(recipe)
        if tokenizer is None:
            print(f"  (tool calls not checked against the chat template: {why})")
        else:
            checked = check_tool_rendering(recipe, tokenizer)
            print(f"  ({checked:,} rows with tools or tool calls render through the base's chat template)")
    if not train_file.is_file():
        print(f"  (data.train {train_file} not found: steps assume 0 rows)")
    else:
        print(f"  (rows counted as non-blank lines of {train_file}; `validate` counts accepted rows)")
    out = rundir.new_run_dir(recipe.name, args.run_dir)
    rundir.write_json(out / "plan.json", {**plan, "model_config_source": source})
    outcome.run_dir = out
    print(f"Plan: {out / 'plan.json'}")
    return EXIT_FAILED if (plan.get("fit") or {}).get("fits") is False else EXIT_OK


def cmd_train(args: argparse.Namespace, outcome: Outcome) -> int:
    """The whole job. The last line names the run directory and the MLflow run id."""
    from pipeline import launch
    from pipeline.model import DeviceUnavailable, ModelNotFound, RevisionMismatch, resolve_model_path

    recipe = _load(args, outcome)
    if recipe.model.init == "random":
        raise UsageError(
            f"{args.recipe}: model.init: random builds random 4-bit weights to measure memory and speed "
            "(scripts/gpu_probe.py); training needs the real weights: set model.init: pretrained"
        )
    outcome.name_recipe(args.recipe, ModelNotFound, RevisionMismatch)
    # A missing base or a wrong revision is found here, before the slow torch/transformers/trl import
    # (benchmarks/cli.md) and before the data contract reads the splits.
    resolve_model_path(recipe.model.path, recipe.model.revision)
    run_dir = launch.train_run_dir(args, recipe)
    processes = launch.num_processes(args, recipe)  # its DeviceUnavailable is about the command line, not the recipe
    if (processes > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        from pipeline import rundir

        run_dir = run_dir or rundir.new_run_dir(recipe.name, None)
        outcome.run_dir = run_dir
        return launch.launch(args, recipe, run_dir, processes)
    from pipeline.train import train  # heavy: torch, transformers, trl

    outcome.name_recipe(args.recipe, ModelNotFound, RevisionMismatch, DeviceUnavailable)
    result = train(
        recipe,
        recipe_source=args.recipe,
        run_dir=run_dir,
        on_start=outcome.update,
        force=args.force,
        resume=args.resume is not None,
    )
    print(f"Run directory: {result.run_dir}  MLflow run: {result.mlflow_run_id or '(tracking disabled)'}")
    return EXIT_OK


SYSTEMS = ("base", "finetuned", "baseline")


def cmd_evaluate(args: argparse.Namespace, outcome: Outcome) -> int:
    """Re-score an existing run; the last line names the run directory and the MLflow run id."""
    recipe = _load(args, outcome)
    run = args.run or args.run_dir
    if not run:
        raise UsageError("evaluate: pass --run RUN (a run directory or an MLflow run id)")
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise UsageError(
                f"--systems {args.systems}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SYSTEMS)}"
            )
    else:
        systems = None  # evaluate.default_systems, the rule train uses too
    if systems and "baseline" in systems and recipe.baseline is None:
        raise UsageError(f"{args.recipe}: --systems baseline needs a baseline section in the recipe")
    from pipeline.evaluate import evaluate_existing
    from pipeline.model import ModelNotFound, RevisionMismatch

    outcome.name_recipe(args.recipe, ModelNotFound, RevisionMismatch)
    result, run_dir, run_id = evaluate_existing(recipe, run, systems=systems, recipe_source=args.recipe)
    from pipeline.tracking import tracking_uri

    outcome.update(run_dir=run_dir, mlflow_run_id=run_id, tracking_uri=tracking_uri(recipe) if run_id else None)
    print(f"Evaluation: {result.eval_dir / 'report.md'}")
    print(f"Run directory: {run_dir}  MLflow run: {run_id or '(tracking disabled)'}")
    return EXIT_OK


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def cmd_ui(args: argparse.Namespace, outcome: Outcome) -> int:
    """Start the MLflow UI for the configured store, on 127.0.0.1 unless told otherwise."""
    import os

    from pipeline.egress import redact_secrets
    from pipeline.tracking import tracking_uri, ui_command

    uri = tracking_uri(_load(args_with_no_overrides(args), outcome) if args.recipe else None)
    from pipeline.egress import EgressGuard

    if not EgressGuard().decide(args.host)[0]:
        raise UsageError(
            f"ui --host {args.host}: the UI binds loopback addresses only (127.0.0.1, ::1), because "
            "it serves run data without authentication. For a team, run an authenticated MLflow server and "
            "point tracking.uri at it."
        )
    command = ui_command(uri, args.host, args.port)
    print(f"MLflow UI for {redact_secrets(uri)} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # Replace this process with the server, so Ctrl-C and kill reach it directly and nothing is orphaned.
    # The audit entry is written first: after exec this process no longer runs our code.
    from pipeline.egress import install_egress_guard

    _audit(args, outcome, EXIT_OK, install_egress_guard())
    os.execv(command[0], command)
    return EXIT_OK  # not reached


def args_with_no_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """``ui`` takes a recipe but no --set."""
    return argparse.Namespace(recipe=args.recipe, overrides=[])


def cmd_sync(args: argparse.Namespace, outcome: Outcome) -> int:
    """Replay a run's queued tracking calls to the MLflow store (tracking.NothingToSync / SyncFailed say why not)."""
    from pipeline.tracking import sync

    if Path(args.run_dir).is_dir():
        outcome.run_dir = Path(args.run_dir)
    _load_run_recipe(Path(args.run_dir), outcome)  # its allow-list guards the upload
    run_id, sent = sync(args.run_dir, args.uri)
    outcome.mlflow_run_id = run_id
    print(f"Synced {sent} tracking operations from {args.run_dir} to MLflow run {run_id}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, outcome: Outcome) -> int:
    """Verify the audit chain; exit 1 when any entry was edited, removed or reordered."""
    import json

    from pipeline.audit import verify

    log = Path(args.log) if args.log else audit_log_path()
    problems = verify(log)
    if problems:
        raise AuditChainBroken(problems)
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries, last = len(lines), json.loads(lines[-1])  # verify() reports an empty log, so there is a last one
    print(f"Audit log {log}: {entries} entries, chain intact (last entry {last['seq']}, hash {last['hash'][:16]}...)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, outcome: Outcome) -> int:
    """Adapter-only export, and with --merge the streamed, verified merge; exit 1 when verification fails."""
    from pipeline.egress import EgressBlocked
    from pipeline.export import VerificationFailed, export_run  # heavy: torch
    from pipeline.model import ModelNotFound, RevisionMismatch

    hosts, store = _export_store(args)
    if Path(args.run).is_dir():
        # A run directory: its allow-list from the start. An MLflow run id: export_run applies the downloaded
        # recipe's allow-list once it has it; until then the store is reached as --recipe/--allowed-host allow.
        _load_run_recipe(Path(args.run), outcome, args.overrides, hosts)
    outcome.name_recipe(
        outcome.recipe_path or f"recipe.resolved.yaml of MLflow run {args.run}", ModelNotFound, RevisionMismatch
    )
    try:
        report = export_run(
            args.run,
            merge=args.merge,
            out=args.out,
            merge_base=args.merge_base,
            overrides=args.overrides,
            register=args.register,
            tracking_uri=store,
            allowed_hosts=hosts,
        )
    except VerificationFailed as exc:
        _record_export(outcome, exc.report, args.overrides, hosts)  # what failed is kept, and is in the audit entry
        raise
    except EgressBlocked as exc:
        if Path(args.run).is_dir():
            raise
        raise EgressBlocked(
            f"{exc} An MLflow run id is looked up before its recipe is known: name the recipe whose "
            "privacy.allowed_hosts allow the store (export RUN_ID --recipe RECIPE), or the host (--allowed-host HOST)."
        ) from exc
    _record_export(outcome, report, args.overrides, hosts)
    where = report.get("merged_dir") or report["adapter_dir"]
    print(
        f"Export: {where}  report: {Path(report['out']) / 'export_report.json'}  MLflow run: {report['mlflow_run_id']}"
    )
    return EXIT_OK


def _export_store(args: argparse.Namespace) -> tuple[tuple[str, ...], str | None]:
    """``export``'s extra allowed hosts and its store, from ``--recipe`` and ``--allowed-host``.

    ``--recipe`` gives its ``privacy.allowed_hosts`` and its ``tracking.uri`` (unless ``--tracking-uri``); the guard
    allows these hosts from now on, by the same ``privacy.allowed_hosts`` rule as a recipe's.
    """
    from pipeline.egress import install_egress_guard
    from pipeline.recipe import PrivacySection, RecipeError, load_recipe
    from pipeline.tracking import tracking_uri

    try:
        PrivacySection(allowed_hosts=args.allowed_hosts)
    except ValueError as exc:  # pydantic's ValidationError names the entry
        raise RecipeError([f"--allowed-host: {e['msg']}" for e in exc.errors()]) from None
    hosts, store = list(args.allowed_hosts), args.tracking_uri
    if args.store_recipe:
        recipe = load_recipe(args.store_recipe)
        hosts = [*recipe.privacy.allowed_hosts, *hosts]
        store = tracking_uri(recipe, explicit=args.tracking_uri)
    hosts = tuple(dict.fromkeys(hosts))
    install_egress_guard(hosts)
    return hosts, store


def _record_export(outcome: Outcome, report: dict, overrides: list[str], hosts: tuple[str, ...] = ()) -> None:
    """The export's audit entry: the run's recipe, recipe and input hashes, output hashes, license acknowledgment.

    With the training run tracked, the entry is attached to that MLflow run like train's and evaluate's. The
    report's store URI has any inline password redacted; such a store then refuses the attachment and says so,
    and the entry stays in the audit log.
    """
    if outcome.recipe is None and report.get("run_dir"):
        # An MLflow run id: export_run fetched the run and loaded its recipe (with the same --set) a moment ago.
        _load_run_recipe(Path(report["run_dir"]), outcome, overrides, hosts)
    outcome.update(
        run_dir=Path(report["out"]),
        mlflow_run_id=report["mlflow_run_id"],
        license_acknowledged=report["license_acknowledgment"],
        tracking_uri=report.get("tracking_uri"),
    )


def cmd_split(args: argparse.Namespace, outcome: Outcome) -> int:
    """Split one file into train and eval; the manifest records counts, the seed and SHA-256s."""
    from pipeline.holdout import split_file, summary

    manifest = split_file(
        args.file,
        args.out,
        args.eval_fraction,
        seed=args.seed,
        contract_path=args.contract,
        text_fields=args.text_fields,
        force=args.force,
    )
    outcome.run_dir = Path(args.out)
    for line in summary(manifest):
        print(line)
    train, evaluation = (manifest["outputs"][name]["path"] for name in ("train", "eval"))
    print(f"Use them with: --set data.train={train} --set data.eval={evaluation}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace, outcome: Outcome) -> int:
    """Infer and write a contract and a recipe (``scaffold.init_project``), then ``validate`` the recipe as it is."""
    from pipeline.scaffold import init_project

    result = init_project(
        args.file,
        target=args.target,
        answer=args.answer,
        name=args.name,
        eval_file=args.eval_file,
        eval_fraction=args.eval_fraction,
        base=args.base,
        force=args.force,
    )
    for line in result.lines:
        print(line)
    # The base may not be here (the 70B, or the demo base not built yet): then the data is checked alone, as
    # `validate --data-only` does, and the next command says what is missing.
    data_only = not result.base_here
    print(f"python -m pipeline validate {result.recipe}{' --data-only' * data_only}:")
    try:
        cmd_validate(argparse.Namespace(recipe=result.recipe, overrides=[], run_dir=None, data_only=data_only), outcome)
    except (UsageError, JobFailed):
        print(
            f"The files are written, and the data does not pass them yet (errors below): fix the data or edit "
            f"{result.contract}, then run: python -m pipeline validate {result.recipe}"
        )
        raise
    if data_only:
        print(
            f"The base of {result.recipe} is not on this machine (its token checks were skipped): put it there "
            f"(the demo base: python scripts/make_demo_assets.py), then: python -m pipeline validate {result.recipe}"
        )
    print(f"Next: python -m pipeline train {result.recipe}")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace, outcome: Outcome) -> int:
    """Move an alias to the run's adapter version; the audit entry records which version, by whom and when."""
    import json
    import re

    from pipeline.promote import promote
    from pipeline.tracking import tracking_uri

    run_dir = Path(args.run)
    if run_dir.is_dir():
        recipe = _load_run_recipe(run_dir, outcome)  # its allow-list and its store
        summary = run_dir / "summary.json"
        run_id = json.loads(summary.read_text(encoding="utf-8")).get("mlflow_run_id") if summary.is_file() else None
        if not run_id:
            raise UsageError(f"{run_dir}: the run has no MLflow run id (tracking disabled, or not finished)")
        uri = args.tracking_uri or tracking_uri(recipe)
    elif re.fullmatch(r"[0-9a-f]{32}", args.run):
        run_id, uri = args.run, args.tracking_uri or tracking_uri()
    else:
        raise UsageError(f"{args.run}: no such run directory, and not an MLflow run id (32 hex digits)")
    outcome.update(mlflow_run_id=run_id, tracking_uri=uri)
    done = promote(uri, run_id, args.alias)
    outcome.promotion = done
    moved = f" (was version {done['previous_version']})" if done["previous_version"] else ""
    print(f"{done['name']}@{done['alias']} -> version {done['version']}{moved}; run {run_id}")
    print(f"Serve it as models:/{done['name']}@{done['alias']}")
    return EXIT_OK


def cmd_runs(args: argparse.Namespace, outcome: Outcome) -> int:
    """Tracked runs in the terminal, newest first."""
    from pipeline.egress import EgressBlocked, redact_secrets
    from pipeline.runlookup import list_runs, render_runs
    from pipeline.tracking import probe_store, tracking_uri

    if args.recipe:
        recipe = _load(args_with_no_overrides(args), outcome)
        uri, experiment = tracking_uri(recipe), recipe.tracking.experiment or recipe.name
    else:
        uri, experiment = tracking_uri(), None
    try:
        # Decided here, once, rather than inside MLflow's HTTP client (which retries for minutes): the egress
        # guard refuses a host that is not allowed at its name lookup, and a server that is down is said at once.
        probe_store(uri)
    except EgressBlocked as exc:
        hint = "" if args.recipe else " Without a recipe only loopback is allowed: pass the recipe (runs RECIPE)."
        raise JobFailed(f"{exc}{hint}") from exc
    except OSError as exc:
        raise JobFailed(f"the tracking store {redact_secrets(uri)} does not answer: {exc}") from exc
    print(render_runs(list_runs(uri, experiment, args.limit)))
    return EXIT_OK


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _input_hashes(recipe, run_dir: Path | None) -> dict[str, str]:  # noqa: ANN001 - pipeline.recipe.Recipe
    """SHA-256 of the contract and data files the recipe names (those that exist).

    Splits that validation already read are taken from its report rather than read a second time.
    """
    import json

    if recipe is None:
        return {}
    report = Path(run_dir) / "validation" / "report.json" if run_dir else None
    known = json.loads(report.read_text(encoding="utf-8"))["splits"] if report and report.is_file() else {}
    hashes = {}
    for key in ("contract", "train", "eval"):
        path = Path(getattr(recipe.data, key))
        if key in known and known[key]["path"] == str(path):
            hashes[f"data.{key}:{path}"] = known[key]["sha256"]
        elif path.is_file():
            hashes[f"data.{key}:{path}"] = _hash_or_why(path)
    return hashes


def _hash_or_why(path: Path) -> str:
    """SHA-256 of a file, or why it could not be read: the audit entry is written after the command's own error."""
    from pipeline.rundir import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


# Each command's handler (``cli_args.build_parser`` defines its arguments).
HANDLERS = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "sync": cmd_sync,
    "audit": cmd_audit,
    "ui": cmd_ui,
    "export": cmd_export,
    "promote": cmd_promote,
    "runs": cmd_runs,
    "split": cmd_split,
    "init": cmd_init,
}
