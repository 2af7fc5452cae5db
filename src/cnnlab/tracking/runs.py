"""One MLflow run per training job: experiment, name, params, tags, artifacts and its end."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from sqlalchemy.exc import SQLAlchemyError

from cnnlab.checks import ConfigError, check_writable, redact_uri
from cnnlab.tracking import retry

log = logging.getLogger("cnnlab")
PACKAGES = ("torch", "lightning", "torchvision", "torchmetrics", "mlflow", "hydra-core")
MAX_TAG_CHARS = 5000  # the error tag keeps the start of a long message; the rest is an artifact
# The kind MLflow 3's UI records when a user files an experiment under "Machine learning".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI does not read that tag to choose a view (its workflow switch is on in the
# open-source build): it shows an experiment as GenAI (overview, traces) or as machine
# learning (the runs table) by this query parameter, else by the browser's last choice,
# else GenAI. So every link cnnlab prints asks for the runs table.
ML_VIEW = "?workflowType=machine_learning"


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config into ``a/b/c`` keys. A node's ``_target_`` becomes the node's own
    value (``optimizer: torch.optim.AdamW``); ``_partial_`` is dropped; passwords in URIs
    are masked."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key == "_partial_":
            continue
        name = prefix.rstrip("/") if key == "_target_" else f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}/"))
        else:
            flat[name] = redact_uri(str(value))[:MAX_PARAM_VAL_LENGTH]
    return flat


def git_state(folder: Path) -> dict[str, str]:
    """The commit checked out in ``folder`` and whether the tree has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def package_versions() -> dict[str, str]:
    return {f"version.{name}": importlib.metadata.version(name) for name in PACKAGES}


def connect(
    tracking_uri: str, retry_s: float = retry.DEFAULT_RETRY_S, *, answered: bool = False
) -> MlflowClient:
    """A client whose store is ready and readable, its calls retried for up to ``retry_s``
    while the store is busy or unreachable (cnnlab.tracking.retry). A fresh sqlite store is
    created under a file lock next to it: processes that migrate one at the same time all
    crash ("table experiments already exists", measured with MLflow 3) and can leave it
    half-migrated for good.

    ``answered``: the store answered this process's sweep before (a sweep job's). A server
    that does not answer is then waited for as a restart, not refused as a wrong URI; and
    after a store this process gave up on, one try: a dead server costs one bound per
    sweep process, not one per job.

    Raises:
        ConfigError: the server does not answer, or the store cannot be opened or read.
        StoreUnavailable: (``answered``) the store stayed busy or unreachable.
    """
    where = redact_uri(tracking_uri)
    if not answered:
        retry.reset(where)
        if tracking_uri.startswith(("http://", "https://")):
            check_reachable(tracking_uri)
    client = _connect(tracking_uri, retry_s, where)
    retry.reset(where)  # it answers: a later outage gets a bound of its own
    return client


def _connect(tracking_uri: str, retry_s: float, where: str) -> MlflowClient:
    database = sqlite_file(tracking_uri)
    try:
        if database is None:
            return _ready(_client(tracking_uri, retry_s, where))
        # sqlite writes its journal beside the database: a read-only folder fails every write
        check_writable(
            f"logger.tracking_uri={where}: the store's folder", database.parent,
            "make it writable, or point logger.tracking_uri (MLFLOW_TRACKING_URI) elsewhere",
        )  # fmt: skip
        with open(f"{database}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            # opening the store creates and migrates it
            return _ready(_client(tracking_uri, retry_s, where))
    except (SQLAlchemyError, MlflowException) as error:
        raise ConfigError(
            f"logger.tracking_uri={where}: the store cannot be opened "
            f"({type(error).__name__}: {retry._first_line(error)}); restore it from a "
            "backup, or point logger.tracking_uri (MLFLOW_TRACKING_URI) at another store"
        ) from error


def _client(tracking_uri: str, retry_s: float, where: str) -> MlflowClient:
    """A retrying client. Making one opens its store (a sqlite store reads its tables), so
    a store another process holds locked is waited out here too, not taken for broken."""
    return retry.call(
        retry.RetryingClient, tracking_uri, retry_s, where, retry_s=retry_s, where=where
    )


def _ready(client: MlflowClient) -> MlflowClient:
    """``client`` once its store answers a read (a corrupt sqlite file fails here)."""
    client.search_experiments(max_results=1)
    return client


def check_reachable(tracking_uri: str, timeout_s: float = 10) -> None:
    """Fail at once on a tracking server that does not answer: MLflow's own client retries
    for minutes before it gives up. Any HTTP answer (even 404 from a proxy) will do."""
    # requests as MLflow uses it: credentials in the URL, MLflow's TLS settings.
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    )
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s, verify=verify)
    except requests.RequestException as error:  # any HTTP answer, even 404, is an answer
        reason = type(error).__name__
        raise ConfigError(
            f"logger.tracking_uri={redact_uri(tracking_uri)}: the tracking server does not "
            f"answer ({reason}); start it (make server) or fix the URI"
        ) from error


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute with four slashes), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])


def open_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if missing (tolerating a concurrent creator),
    tagged as an experiment of model training (EXPERIMENT_KIND) unless it has a kind.

    A new experiment in a sqlite store keeps its artifacts in ``artifact_location``, by
    default ``mlartifacts/`` beside the database, so a store and its artifacts travel
    together; a tracking server decides its own.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"logger.experiment_name={name}: experiment {experiment.experiment_id} of that name "
            f"is in MLflow's trash in {redact_uri(client.tracking_uri)} (deleted, not purged); "
            f"restore it (mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}), purge it (mlflow gc), or choose another name"
        )
    if experiment is not None:
        kind, value = next(iter(EXPERIMENT_KIND.items()))
        if kind not in experiment.tags:  # made before cnnlab tagged; a user's own kind stays
            client.set_experiment_tag(experiment.experiment_id, kind, value)
        return experiment.experiment_id
    database = sqlite_file(client.tracking_uri)
    location = None
    if database is not None:
        folder = Path(artifact_location) if artifact_location else database.parent / "mlartifacts"
        location = folder.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def unique_run_name(client: MlflowClient, experiment_id: str, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... when runs of that name exist already."""
    taken = run_names_like(client, experiment_id, base)
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"


def run_names_like(client: MlflowClient, experiment_id: str, base: str) -> set[str]:
    """The names of the experiment's runs that start with ``base``. MLflow's filter language
    has no escape for a quote, so the store is asked for the part of ``base`` before the
    first quote or backslash (``%`` and ``_`` only widen the LIKE) and the rest is compared
    here; every page is read."""
    prefix = re.split(r"['\"\\]", base, maxsplit=1)[0]
    names: set[str] = set()
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.run_name LIKE '{prefix}%'",
            max_results=5000,
            page_token=token,
        )
        names |= {run.info.run_name for run in page if run.info.run_name.startswith(base)}
        token = page.token
        if not token:
            return names


class TrackedRun:
    """Creates the run on entry; on exit ends it FINISHED, FAILED (error tag and traceback
    artifact) or KILLED (Ctrl-C, SIGTERM, any SystemExit), so a run is never left RUNNING.

    While the run is open, SIGTERM raises ``SystemExit(143)`` so that the run is closed
    also when the signal arrives outside Lightning's own handling (which raises its
    ``SIGTERMException``, a SystemExit too).
    """

    def __init__(
        self, client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str]
    ) -> None:
        self.client = client
        self.run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = self.run.info.run_id
        self._previous_sigterm = None
        self._monitor = None  # the system metrics' thread (monitor_system)

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> TrackedRun:
        """An existing run, RUNNING again (resumed), with ``tags`` added or updated and the
        ``error`` of its interruption gone: a run that then finishes has none."""
        if "error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "error")
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        run = cls.__new__(cls)
        run.client, run.run_id, run._previous_sigterm, run._monitor = client, run_id, None, None
        run.run = client.get_run(run_id)
        return run

    def __enter__(self) -> TrackedRun:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, exit_on_sigterm)
        return self

    def log_params(self, params: Mapping[str, str]) -> None:
        """All of ``params``, in as many ``log_batch`` calls as MLflow's limit per call needs."""
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(
                self.run_id, params=items[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            )

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        self.client.log_metric(self.run_id, key, value, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_datasets(self, datasets: Iterable[Mapping[str, Any]]) -> None:
        """Each of ``datasets`` as one of the run's dataset inputs: its ``name``, ``digest``,
        ``source`` (a local file or folder), ``rows`` and ``context`` (train, validation or
        test). Only what identifies the data is stored, never the images."""
        inputs = []
        for dataset in datasets:
            source = LocalArtifactDatasetSource(str(dataset["source"]))
            meta = MetaDataset(source, name=dataset["name"], digest=dataset["digest"]).to_dict()
            entity = Dataset(**meta, profile=json.dumps({"num_rows": dataset["rows"]}))
            context = InputTag(MLFLOW_DATASET_CONTEXT, dataset["context"])
            inputs.append(DatasetInput(entity, tags=[context]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def monitor_system(self, every_s: float, *, resumed: bool = False) -> None:
        """Log CPU, memory, disk, network (and NVIDIA GPU, with nvidia-ml-py) use as the
        run's ``system/*`` metrics every ``every_s`` seconds, from a thread that stops when
        the run ends, however it ends. A ``resumed`` run's steps go on from its last."""
        # imported when used: it needs psutil, which MLflow itself does not require
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start and stop are four INFO lines a run in a training log; problems still show.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=every_s,
            resume_logging=resumed,
            tracking_uri=self.client.tracking_uri,
        )
        self._monitor.start()

    def _stop_monitor(self) -> None:
        """Stop the system metrics' thread and send what it holds, before the run ends: no
        metric is written after its end."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()  # logs, never raises, a store that refuses the last batch

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._stop_monitor()
        if error is None:
            self.client.set_terminated(self.run_id, "FINISHED")
        elif isinstance(error, KeyboardInterrupt | SystemExit):
            self._end_with_error("KILLED", f"interrupted ({type(error).__name__})")
        else:
            self._end_with_error("FAILED", f"{type(error).__name__}: {error}", kind, error, trace)

    def end_failed(self, message: str) -> None:
        """End the run FAILED with ``message`` as its error (a job refused before training)."""
        self._stop_monitor()
        self._end_with_error("FAILED", message)

    def _end_with_error(self, status: str, message: str, *exc_info) -> None:
        """Record what went wrong, as far as the store lets us, then end the run anyway. A
        store that is down gets the error that ended the run, not one about its end: the run
        then stays RUNNING there until its death is noticed (tracking.end_dead_runs)."""
        try:
            try:
                self.client.set_tag(self.run_id, "error", redact_uri(message)[:MAX_TAG_CHARS])
                if exc_info:
                    text = redact_uri("".join(traceback.format_exception(*exc_info)))
                    self.client.log_text(self.run_id, text, "error/traceback.txt")
            finally:
                self.client.set_terminated(self.run_id, status)
        except retry.StoreUnavailable as error:
            log.warning("run %s could not be ended %s: %s", self.run_id, status, error)


def logged_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step logged for each metric of ``run_id``."""
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def process_tags() -> dict[str, str]:
    """Who writes a run: host and pid, and the Slurm job, so that a run left RUNNING by a
    process that died without a word (SIGKILL, power loss) is told apart from a live one."""
    tags = {"cnnlab.host": socket.gethostname(), "cnnlab.pid": str(os.getpid())}
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
        tags["slurm.restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return tags


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_restarted() -> bool:
    """True in a Slurm job that Slurm has requeued and started again."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return "SLURM_JOB_ID" in os.environ and restarts.isdigit() and int(restarts) > 0


def slurm_job_ended(job_id: str) -> bool:
    """Whether Slurm says job ``job_id`` runs no more (False when it cannot say)."""
    try:
        squeue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    if squeue.returncode != 0:  # gone from the controller's memory altogether
        return "Invalid job id" in squeue.stderr
    return squeue.stdout.strip() in ("", "PENDING", "COMPLETED", "CANCELLED", "FAILED")


def died_here(tags: Mapping[str, str]) -> bool:
    """A run's process was on this host and is gone (a reused pid reads as alive: safe)."""
    pid = tags.get("cnnlab.pid", "")
    return (
        tags.get("cnnlab.host") == socket.gethostname()
        and pid.isdigit()
        and not process_alive(int(pid))
    )


def end_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED (tag ``cnnlab.died``) each RUNNING run of the experiment whose process on
    this host is gone; returns their ids. Runs of other hosts are left to their hosts."""
    dead = [
        run
        for run in client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=5000
        )
        if died_here(run.data.tags)
    ]
    for run in dead:
        client.set_tag(run.info.run_id, "cnnlab.died", "process gone while RUNNING")
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in dead]


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run: the tracking server's page, or ``make ui``'s."""
    return f"{ui_address(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}{ML_VIEW}"


def experiment_link(tracking_uri: str, experiment_id: str) -> str:
    """Where a person opens the experiment's runs table."""
    return f"{ui_address(tracking_uri)}/#/experiments/{experiment_id}/runs{ML_VIEW}"


def ui_address(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return redact_uri(tracking_uri.rstrip("/"))
    return "make ui, then http://127.0.0.1:5000"


def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that unwinds like ``sys.exit``, so runs get closed on the way."""
    raise SystemExit(128 + signum)
