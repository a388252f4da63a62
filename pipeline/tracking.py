"""MLflow tracking: the only module that imports mlflow.

One MLflow run per ``train``. The default store is a SQLite file in the working directory
(``sqlite:///mlruns.db``) with artifacts in ``mlartifacts/`` beside it; ``MLFLOW_TRACKING_URI`` in the
environment, then ``tracking.uri`` in the recipe, choose another (``tracking_uri`` is the one rule). Params are
the resolved recipe flattened to dotted keys and sent in batches within MLflow's limits, so a long value or many
keys never crash a run. The lineage facts that are not MLflow's (git commit, weight digests) are computed by
the caller (``env.project_commit``, ``model.weight_files_digest``) and passed in.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline import rundir
from pipeline.egress import redact_secrets
from pipeline.errors import JobFailed, UsageError
from pipeline.recipe import Recipe, flatten

# MLflow's own limits (mlflow.utils.validation): 100 params per batch call, 6,000 characters per value,
# 250 per key. Values are cut with a marker rather than rejected.
PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
TRUNCATED = "...[truncated]"
DEFAULT_URI = "sqlite:///mlruns.db"


def tracking_uri(recipe: Recipe | None = None, *, explicit: str | None = None, configured: str | None = None) -> str:
    """The MLflow store to use, by the one rule: ``explicit`` > ``MLFLOW_TRACKING_URI`` > configured > the default.

    Args:
        recipe: A recipe whose ``tracking.uri`` is the configured store (unless ``configured`` is given).
        explicit: A store named for this one call (e.g. ``export --tracking-uri``); wins over everything.
        configured: The store a run was meant for, where there is no recipe (``sync``: the queue's own store).

    Returns:
        The URI; ``sqlite:///mlruns.db`` (in the working directory) when nothing names one.
    """
    if explicit:
        return explicit
    if configured is None and recipe is not None:
        configured = recipe.tracking.uri
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def artifact_root(uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ``mlartifacts/`` next to the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def params_for(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as MLflow params: dotted keys, string values within MLflow's length limits."""
    return within_limits(flatten(recipe.model_dump(mode="json")))


def within_limits(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow accepts them: secrets redacted, values cut to 6,000 characters with a marker.

    Characters MLflow refuses in a key (it allows letters, digits, ``_ - . /`` and spaces) become ``_``. A key
    over 250 characters keeps its first 241 and gets ``-`` + 8 hex digits of its SHA-1, so two long keys that
    share a prefix stay two params.
    """
    import hashlib
    import re

    out = {}
    for key, value in params.items():
        text = "" if value is None else redact_secrets(str(value))
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED
        key = re.sub(r"[^\w\-./ ]", "_", str(key), flags=re.ASCII)
        if len(key) > MAX_KEY:
            key = key[: MAX_KEY - 9] + "-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        out[key] = text
    return out


class Tracker:
    """An MLflow run, or a queue of what it would receive while the tracking server cannot be reached.

    Uses an explicit ``MlflowClient`` bound to one store rather than mlflow's global "active run" state, so
    several runs against different stores in one process (notebooks, tests) never mix.

    If the store is unreachable when the run starts, or a call fails later, the user is told once and the
    job goes on: every further call is appended to ``<run_dir>/tracking/pending.jsonl`` (artifacts by path,
    they are in the run directory anyway) and ``python -m pipeline sync RUN_DIR`` replays it later.

    A store that answers but refuses one call (a 4xx: a param logged again with another value, a name it
    does not accept) is not "unreachable": replaying the call would be refused again. That call is named in
    a warning and recorded in ``<run_dir>/tracking/rejected.jsonl``, and the run goes on logging.

    Used as a context manager (``with Tracker(...) as tracker:``) it closes the run itself: FINISHED when the
    block ends normally (an early ``return`` included), FAILED when an exception leaves it.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_name: str,
        run_dir: str | Path | None = None,
        run_id: str | None = None,
        resume_run_id: str | None = None,
        *,
        main_process: bool = True,
        uri: str | None = None,
    ):
        """Start the run; add to ``run_id`` (``evaluate --run``); or reopen ``resume_run_id`` (``train --resume``).

        ``main_process=False`` (ranks other than 0 of a multi-process job) tracks nothing and writes no file, so a
        job is one MLflow run and one run directory however many processes train. ``uri`` is a store named for
        this one command (``export --tracking-uri``), which wins over the recipe's by ``tracking_uri``'s rule.
        """
        self.main_process = main_process
        self.enabled = recipe.tracking.enabled and main_process
        self.run_id: str | None = None
        self.uri = tracking_uri(recipe, explicit=uri)
        self.offline = False
        self._pending = Path(run_dir) / "tracking" / "pending.jsonl" if run_dir is not None else None
        self._sender: Any = None  # the metrics sender thread, started on the first metrics call
        self._in_flight: list[Any] = []
        self._lock = threading.Lock()
        if not self.enabled:
            return
        self._experiment = recipe.tracking.experiment or recipe.name
        self._run_name = run_name
        self.run_id = run_id  # kept if the store is down, so `sync` adds to this run rather than a new one
        bound_http_retries()
        try:
            probe_store(self.uri)
            self._client = client_for(self.uri)
            if run_id is not None:  # add to an existing run (``evaluate --run``)
                self.run_id = self._client.get_run(run_id).info.run_id
            else:
                self.run_id = reopen_run(self._client, resume_run_id) if resume_run_id else None
            if self.run_id is None:
                self.run_id = start_run(self._client, self.uri, self._experiment, run_name)
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
            self._go_offline(exc)

    @classmethod
    def for_training(cls, recipe: Recipe, run_dir: Path, *, resume: bool = False, main_process: bool = True) -> Tracker:
        """The tracker of a ``train`` run, its MLflow run id kept in ``<run_dir>/tracking/run.json``.

        A resumed run reopens the MLflow run that file names, so the run continues rather than starting anew.
        """
        record = Path(run_dir) / "tracking" / "run.json"
        reopen = None
        if resume and record.is_file():
            reopen = json.loads(record.read_text(encoding="utf-8")).get("mlflow_run_id")
        tracker = cls(recipe, run_dir.name, run_dir=run_dir, resume_run_id=reopen, main_process=main_process)
        if main_process and tracker.run_id:
            rundir.write_json(record, {"mlflow_run_id": tracker.run_id})
        return tracker

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: Any) -> None:
        """Close the run FINISHED, or FAILED with the reason as the ``failure_reason`` tag (the exception goes on)."""
        if exc_type is not None:
            # What the terminal said, first line (a disk full, a broken contract), so the UI shows why it failed.
            reason = f"{exc_type.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            self.set_tags({"failure_reason": redact_secrets(reason)[:MAX_PARAM_VALUE]})
        self.end("FAILED" if exc_type is not None else "FINISHED")

    def write_artifact(self, path: str | Path, content: Any) -> Path:
        """Write a run-directory file atomically (text as is, anything else as indented JSON) and log it.

        Only the main process writes (other ranks' trackers neither write nor log), so callers need no rank guard.
        """
        path = Path(path)
        if self.main_process:
            if isinstance(content, str):
                rundir.write_text(path, content)
            else:
                rundir.write_json(path, content)
        self.log_artifact(path)
        return path

    # Each public call becomes one operation, done now or queued for `sync`.
    def log_params(self, params: dict[str, str]) -> None:
        """Log params (within MLflow's limits, sent in batches of at most 100)."""
        self._op("params", within_limits(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the run (pipeline version, base model, task...), secrets redacted."""
        self._op("tags", {k: redact_secrets(str(v))[:MAX_PARAM_VALUE] for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numeric metrics; non-numeric values are skipped."""
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self._op("metrics", {"values": numeric, "step": step or 0, "time": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a whole directory into the run's artifacts."""
        self._op("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """A table (column -> values) as a JSON artifact MLflow shows as a table (``mlflow.log_table``)."""
        self._op("table", {"data": data, "artifact_file": artifact_file})

    def log_inputs(self, datasets: list[dict[str, Any]]) -> None:
        """Dataset inputs from ``dataset_inputs``."""
        self._op("inputs", {"datasets": datasets})

    def register(self, name: str, artifact_path: str, tags: dict[str, str], description: str = "") -> str | None:
        """A new registry version of the run's ``artifact_path``; its number, or None when queued or disabled."""
        payload = {"name": name, "artifact_path": artifact_path, "tags": tags, "description": description}
        if not self.enabled:
            return None
        self.flush()
        if not self.offline:
            try:
                with self._lock:
                    return register_version(self._client, self.run_id, **payload)
            except Exception as exc:  # noqa: BLE001 - the job goes on without the server
                if _rejected(exc):  # refused (a name the registry does not accept): queueing would be refused again
                    self._reject("register", payload, exc)
                    return None
                self._go_offline(exc)
        self._queue("register", payload)
        return None

    def run_lineage(self) -> dict[str, str]:
        """The run's lineage tags (``pipeline.*``, ``base_model*``) and ``eval.*`` tags and metrics, as strings.

        What a registry version made after training (``export --register``) carries, like the adapter's version;
        empty when tracking is off or the store is unreachable (the version queued for ``sync`` then has only
        the tags its caller gives).
        """
        if not self.enabled or self.offline:
            return {}
        self.flush()  # the eval metrics just logged are part of what it carries
        try:
            with self._lock:
                run = self._client.get_run(self.run_id)
        except Exception as exc:  # noqa: BLE001 - the job goes on without the server
            self._go_offline(exc)
            return {}
        carried = {
            k: v
            for k, v in run.data.tags.items()
            if k.split(".")[0] in ("pipeline", "base_model") or k.startswith("eval.")
        }
        carried.update({k: str(v) for k, v in run.data.metrics.items() if k.startswith("eval.")})
        return carried

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as FINISHED, FAILED or KILLED (after every metric still in flight)."""
        self._op("end", {"status": status})
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None

    def flush(self) -> None:
        """Wait for the metrics in flight: every other call waits for them, so the store sees calls in order."""
        in_flight, self._in_flight = self._in_flight, []
        for future in in_flight:
            future.result()

    def _op(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if kind == "metrics" and not self.offline:
            # The training loop logs every logging_steps: a slow or dying server must not hold a step. One
            # background thread sends them in order; the trainer goes on at once.
            if self._sender is None:
                from concurrent.futures import ThreadPoolExecutor

                self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-tracking")
            self._in_flight.append(self._sender.submit(self._send, kind, payload))
            return
        self.flush()
        self._send(kind, payload)

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        with self._lock:  # the sender thread and the caller never both talk to the store or write the queue
            if not self.offline:
                try:
                    apply_op(self._client, self.run_id, kind, payload)
                    return
                except Exception as exc:  # noqa: BLE001 - the job goes on without the server
                    if _rejected(exc):
                        self._reject(kind, payload, exc)
                        return
                    self._go_offline(exc)
            self._queue(kind, payload)

    def _reject(self, kind: str, payload: dict[str, Any], exc: Exception) -> None:
        reason = redact_secrets(str(exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__
        where = self._pending.parent / "rejected.jsonl" if self._pending else None
        print(
            f"warning: MLflow tracking at {redact_secrets(self.uri)} refused a {kind} call: {reason}. The run "
            f"goes on logging; the refused call is recorded in {where or 'nowhere (no run directory)'}.",
            file=sys.stderr,
            flush=True,
        )
        if where is not None:
            where.parent.mkdir(parents=True, exist_ok=True)
            with where.open("a", encoding="utf-8") as handle:
                keys = sorted(payload.get("values", payload)) if kind in ("params", "tags", "metrics") else []
                handle.write(json.dumps({"op": kind, "keys": keys[:100], "reason": reason}) + "\n")

    def _go_offline(self, exc: Exception) -> None:
        self.offline = True
        where = self._pending.parent if self._pending else "nowhere (no run directory)"
        print(
            f"warning: MLflow tracking at {redact_secrets(self.uri)} is unreachable ({type(exc).__name__}: "
            f"{redact_secrets(str(exc))[:200]}). Training continues; params, metrics and artifacts are kept in "
            f"{where} and `python -m pipeline sync RUN_DIR` uploads them when the server is back.",
            file=sys.stderr,
            flush=True,
        )
        if self._pending is not None and not self._pending.exists():
            self._queue(
                "start",
                # A password in MLFLOW_TRACKING_URI stays in the environment; sync reads it from there again.
                {
                    "uri": redact_secrets(self.uri),
                    "experiment": self._experiment,
                    "run_name": self._run_name,
                    "run_id": self.run_id,
                },
            )

    def _queue(self, kind: str, payload: dict[str, Any]) -> None:
        if self._pending is not None:
            append_op(self._pending, kind, payload)


def append_op(pending: Path, kind: str, payload: dict[str, Any]) -> None:
    """One operation at the end of a run's queue (``tracking/pending.jsonl``) for ``sync``."""
    pending.parent.mkdir(parents=True, exist_ok=True)
    with pending.open("a+b") as handle:
        # A line cut short by kill -9 (train --resume appends after it) must not swallow the next one.
        size, torn = handle.seek(0, os.SEEK_END), False
        if size:
            handle.seek(size - 1)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + json.dumps({"op": kind, **payload}) + "\n").encode("utf-8"))


def queue_annotation(run_dir: Path, tags: dict[str, str], files: list[Path]) -> bool:
    """Queue the tags and files ``annotate_run`` could not send, in a run that is queued for ``sync``.

    Each file is copied into ``tracking/`` first, so ``sync`` uploads it as it was now. False when the run has no
    queue (it was tracked live, or not at all): there is nothing ``sync`` would send it with.
    """
    import shutil

    pending = Path(run_dir) / "tracking" / "pending.jsonl"
    if not pending.is_file():
        return False
    append_op(pending, "tags", tags)
    for path in files:
        if Path(path).is_file():
            kept = shutil.copyfile(path, pending.parent / Path(path).name)
            append_op(pending, "artifact", {"path": str(kept), "artifact_path": "audit"})
    return True


def _rejected(exc: Exception) -> bool:
    """True when the store answered and refused the call (HTTP 4xx), rather than could not be reached.

    MLflow reports both as ``MlflowException``: a refusal carries a 4xx error code (INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS...), a connection failure or a 5xx an INTERNAL_ERROR-like 5xx one.
    """
    status = getattr(exc, "get_http_status_code", None)
    try:
        return status is not None and 400 <= int(status()) < 500
    except Exception:  # noqa: BLE001 - an exception type with an unexpected get_http_status_code
        return False


# MLflow's HTTP client retries a failed call 7 times with doubling backoff and waits up to 120 s a request: a
# tracking server killed mid-run stalled training ~5.5 minutes before the run went offline. A run queues what it
# cannot send (``sync`` uploads it later), so it gives up in seconds; ``sync`` itself keeps MLflow's defaults.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries and timeouts for this process (values the user set in the environment win)."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def client_for(uri: str) -> Any:
    """An MlflowClient bound to ``uri`` (tracking and registry on the same store)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def probe_store(uri: str, timeout: float = 3.0) -> None:
    """Fail fast when an HTTP tracking server does not accept connections (MLflow itself retries for minutes).

    Raises:
        privacy.EgressBlocked: The egress guard refuses the host (at its name lookup, before any packet).
        OSError: The server does not answer.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass


# MLflow 3's UI guesses an experiment's kind and opened ours on the GenAI view (empty traces); this tag opens the
# model-training view (runs table, loss curves, metrics side by side). A kind the user set is left alone.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CANDIDATE = "candidate"


def start_run(client: Any, uri: str, experiment: str, run_name: str) -> str:
    """Create (or reuse) the experiment, tagged as model development, and start a run in it; returns the run id."""
    key, kind = EXPERIMENT_KIND
    found = client.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_root(uri), tags={key: kind})
    else:
        experiment_id = found.experiment_id
        if key not in (found.tags or {}):
            client.set_experiment_tag(experiment_id, key, kind)
    return client.create_run(experiment_id, run_name=run_name).info.run_id


def reopen_run(client: Any, run_id: str) -> str | None:
    """Mark an existing run RUNNING again (a resumed training run); None when this store does not have it.

    A run killed with ``kill -9`` never closed itself, so MLflow still shows it RUNNING (or FAILED after a
    clean interruption); resuming continues the same run: its metrics go on from the checkpoint's step and it
    ends FINISHED or FAILED like any other run.
    """
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a different store, or the run was deleted: start a new one
        return None
    client.update_run(run_id, status="RUNNING")
    return run_id


def apply_op(client: Any, run_id: str | None, kind: str, payload: dict[str, Any]) -> None:
    """Send one operation to the store (used live and by ``sync``)."""
    from mlflow.entities import Metric, Param, RunTag

    if kind == "params":
        items = [Param(k, v) for k, v in payload.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])
    elif kind == "metrics":
        batch = [Metric(k, v, payload["time"], payload["step"]) for k, v in payload["values"].items()]
        for start in range(0, len(batch), 1000):  # MLflow accepts up to 1,000 metrics per batch
            client.log_batch(run_id, metrics=batch[start : start + 1000])
    elif kind == "artifact":
        path = Path(payload["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=payload["artifact_path"] or path.name)
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path=payload["artifact_path"])
    elif kind == "table":
        client.log_table(run_id, data=payload["data"], artifact_file=payload["artifact_file"])
    elif kind == "end":
        client.set_terminated(run_id, status=payload["status"])
    elif kind == "inputs":
        log_dataset_inputs(client, run_id, payload["datasets"])
    elif kind == "register":
        register_version(client, run_id, **payload)


def read_pending(pending: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The queued operations, and the numbers of the lines skipped because a crash cut them short.

    ``kill -9`` during a write leaves a partial last line (and ``train --resume`` then appends after it). Such a
    line is skipped, never fatal: every complete operation is still uploaded.

    Raises:
        ValueError: The first line is not the run's ``start`` record (not a queue this pipeline wrote).
    """
    ops, torn = [], []
    for number, line in enumerate(pending.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except ValueError:
            op = None
        if isinstance(op, dict) and isinstance(op.get("op"), str):
            ops.append(op)
        else:
            torn.append(number)
    if not ops or ops[0]["op"] != "start":
        raise ValueError(f"{pending}: the first line is not the run's start record; this is not a tracking queue")
    return ops, torn


class NothingToSync(UsageError):
    """``sync`` of a directory without a tracking queue (tracked live, already synced, or not a run directory)."""


class SyncFailed(JobFailed):
    """``sync`` could not upload (the store is down, refused, or not allowed); the queue is kept for the next try."""


def sync(run_dir: str | Path, uri: str | None = None) -> tuple[str, int]:
    """Upload what a run queued while the tracking server was unreachable.

    Progress is recorded in ``tracking/sync_progress.json`` after each operation, so a sync that stops partway
    (the server goes down again, Ctrl-C) resumes where it stopped instead of sending the metrics twice; at most
    the one operation in flight when it stopped is sent again.

    Args:
        run_dir: The run directory holding ``tracking/pending.jsonl``.
        uri: Store to upload to; by default the one the run was meant for (MLFLOW_TRACKING_URI wins).

    Returns:
        The MLflow run id and the number of operations sent by this call. The queue is renamed to
        ``synced.jsonl``.

    Raises:
        NothingToSync: There is no ``tracking/pending.jsonl``.
        SyncFailed: The upload failed: an MLflow error, a connection error (the egress guard's refusal
            included), or a queue or progress file that is not what a run wrote. The queue is kept.
    """
    pending = Path(run_dir) / "tracking" / "pending.jsonl"
    if not pending.is_file():
        raise NothingToSync(f"{pending}: nothing to sync (the run was tracked live, or this is not a run directory)")
    from mlflow.exceptions import MlflowException

    try:
        return _upload(pending, uri)
    except (MlflowException, OSError, ValueError) as exc:  # OSError: connection errors, requests' and the guard's
        raise SyncFailed(
            f"sync failed, {pending} is kept and the next try resumes after what was sent: {type(exc).__name__}: "
            f"{redact_secrets(str(exc))[:300]}"
        ) from exc


def _upload(pending: Path, uri: str | None) -> tuple[str, int]:
    """``sync``'s work: replay the queue after what an earlier sync sent, then rename it ``synced.jsonl``."""
    ops, torn = read_pending(pending)
    if torn:
        print(
            f"warning: {pending}: skipped line(s) {', '.join(map(str, torn))}: cut short by a crash (kill -9), not "
            "complete operations; everything else is uploaded",
            file=sys.stderr,
        )
    start = ops[0]
    # `sync --uri` stands in for the run's own store: MLFLOW_TRACKING_URI still wins over it (cli's --uri help).
    target = tracking_uri(configured=uri or start["uri"])
    probe_store(target)  # a store still down, or refused by the egress guard, is said at once (MLflow retries minutes)
    client = client_for(target)
    progress_file = pending.with_name("sync_progress.json")
    progress = json.loads(progress_file.read_text(encoding="utf-8")) if progress_file.is_file() else {}
    if progress.get("uri") != redact_secrets(target):
        progress = {}  # another store: everything goes there
    run_id = progress.get("run_id") or start.get("run_id")
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - the run was never created on this store
            run_id, progress = None, {}
    if run_id is None:
        run_id = start_run(client, target, start["experiment"], start["run_name"])
    done = int(progress.get("done", 0))
    for index, op in enumerate(ops[1:], start=1):
        if index <= done:
            continue  # sent by an earlier sync that stopped partway
        kind = op.pop("op")
        apply_op(client, run_id, kind, op)
        rundir.write_json(progress_file, {"uri": redact_secrets(target), "run_id": run_id, "done": index})
    pending.rename(pending.with_name("synced.jsonl"))
    progress_file.unlink(missing_ok=True)
    return run_id, len(ops) - 1 - done


def run_dir_of(uri: str, run_id: str) -> str | None:
    """The run directory an MLflow run was logged from (its ``run_dir`` tag), or None if the run has none.

    Raises:
        LookupError: The store has no such run.
    """
    try:
        run = client_for(uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - mlflow raises its own exception types for a missing run
        raise LookupError(f"no MLflow run {run_id} in {redact_secrets(uri)} ({type(exc).__name__})") from None
    return run.data.tags.get("run_dir")


def annotate_run(uri: str, run_id: str, tags: dict[str, str], files: list[Path]) -> None:
    """Add tags and files to an existing (possibly finished) run, e.g. the audit entry of the command.

    Raises:
        OSError: The server does not answer (found in seconds: MLflow's own retries would hold the command's
            exit for minutes after its work is done).
    """
    probe_store(uri)
    client = client_for(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path="audit")


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line for a store, bound to ``host`` (127.0.0.1 by default)."""
    import sys

    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    root = artifact_root(uri)
    if root is not None:
        command += ["--default-artifact-root", root]
    return command


# --------------------------------------------------------------------------------------------------
# Lineage: dataset inputs, lineage tags, the registry, and reading runs back (runs command, notebook)

DIGEST_CHARS = 32  # MLflow stores a dataset digest in 36 characters: the first 32 hex digits of its SHA-256
_COLSPEC_TYPES = {"string": "string", "integer": "long", "number": "double", "boolean": "boolean"}


def dataset_inputs(report: dict[str, Any], contract: Any) -> list[dict[str, Any]]:
    """Each validated split as an MLflow dataset input: source path, content digest, counts, schema.

    No row content is logged: the source is the file's path, the digest its SHA-256, the profile the contract
    report's counts, and the schema the contract's field types.

    Args:
        report: ``validation/report.json`` (``data.validate_data``'s report).
        contract: The ``DataContract`` the splits were checked against.
    """
    columns = []
    for name, rule in contract.fields.items():
        if rule.type == "list":
            item = _COLSPEC_TYPES.get(rule.items.type if rule.items else "string", "string")
            kind: Any = {"type": "array", "items": {"type": item}}
        else:
            kind = _COLSPEC_TYPES[rule.type]
        columns.append({"name": name, "type": kind, "required": rule.required})
    schema = json.dumps({"mlflow_colspec": columns})
    meta = report["contract"]
    inputs = []
    for split, summary in report["splits"].items():
        profile = {k: summary[k] for k in ("rows_in", "rows_accepted", "rows_quarantined", "failed_checks")}
        inputs.append(
            {
                "name": f"{split}:{Path(summary['path']).name}",
                "digest": summary["sha256"][:DIGEST_CHARS],
                "source_type": "local",
                "source": json.dumps({"uri": str(Path(summary["path"]).resolve()), "sha256": summary["sha256"]}),
                "schema": schema,
                "profile": json.dumps({**profile, "sha256": summary["sha256"]}),
                "tags": {
                    "mlflow.data.context": split,
                    "contract.name": str(meta["name"]),
                    "contract.version": str(meta["version"]),
                    "contract.sha256": str(meta["sha256"]),
                    "contract.report": "validation/report.json",
                    "contract.reconciled": str(report.get("reconciled")),
                },
            }
        )
    return inputs


def lineage_tags(
    recipe: Recipe, model_dir: str | Path, license_id: str, *, commit: str, weights_sha256: str
) -> dict[str, str]:
    """Tags that say what produced a run: code commit and version, base model id, revision, weights, license.

    Args:
        recipe: The run's recipe (base model id and pinned revision).
        model_dir: Where the base was found; in the HF cache its name is the revision.
        license_id: The base's license (``licenses.resolve``).
        commit: The pipeline's git commit (``env.project_commit()``).
        weights_sha256: The combined digest of the base's weight files (``model.weight_files_digest``).
    """
    from pipeline import __version__

    model_dir = Path(model_dir)
    # In the HF cache the snapshot directory is named by the commit: .../snapshots/<revision>/
    revision = recipe.model.revision or (model_dir.name if model_dir.parent.name == "snapshots" else "local")
    return {
        "pipeline.version": __version__,
        "pipeline.git_commit": commit,
        "base_model": recipe.model.path,
        "base_model.revision": revision,
        "base_model.weights_sha256": weights_sha256,
        "base_model.license": license_id,
    }


def log_dataset_inputs(client: Any, run_id: str | None, datasets: list[dict[str, Any]]) -> None:
    """Send dataset inputs (payloads from ``dataset_inputs``) to a run."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=d["digest"],
                    source_type=d["source_type"],
                    source=d["source"],
                    schema=d["schema"],
                    profile=d["profile"],
                ),
                tags=[InputTag(k, v) for k, v in d["tags"].items()],
            )
            for d in datasets
        ],
    )


def register_version(
    client: Any,
    run_id: str | None,
    name: str,
    artifact_path: str,
    tags: dict[str, str],
    description: str = "",
) -> str:
    """Register a run's artifact directory as a new version of ``name`` in the Model Registry; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={k: redact_secrets(str(v))[:MAX_PARAM_VALUE] for k, v in tags.items()},
        description=description,
        await_creation_for=0,
    )
    # Aliases replaced the registry's stages: the newest version is the candidate; `promote` moves champion.
    client.set_registered_model_alias(name, CANDIDATE, str(version.version))
    return str(version.version)


def download_run(uri: str, run_id: str, dest: Path) -> Path:
    """Download a run's artifacts (adapter, recipe, validation, eval, summary) into ``dest``; returns it."""
    client = client_for(uri)
    dest.mkdir(parents=True, exist_ok=True)
    for item in client.list_artifacts(run_id):
        if item.path in ("adapter", "recipe.resolved.yaml", "validation", "eval", "summary.json", "plan.json"):
            client.download_artifacts(run_id, item.path, str(dest))
    return dest
