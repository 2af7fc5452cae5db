"""One MLflow run per training job: experiment, name, params, tags, artifacts and its end."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import signal
import subprocess
import threading
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from cnnlab.checks import redact_uri
from cnnlab.tracking import retry

log = logging.getLogger("cnnlab")
PACKAGES = ("torch", "lightning", "torchvision", "torchmetrics", "mlflow", "hydra-core")
MAX_TAG_CHARS = 5000  # the error tag keeps the start of a long message; the rest is an artifact
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
