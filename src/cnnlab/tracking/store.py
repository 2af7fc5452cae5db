"""The MLflow store a process writes to: reached and ready (a fresh sqlite store created
under a lock, a server that does not answer refused at once), refused where a command needs
runs already recorded, and the experiment opened."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from cnnlab.checks import ConfigError, check_writable, redact_uri
from cnnlab.tracking import retry

# The kind MLflow 3's UI records when a user files an experiment under "Machine learning".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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


def require_store(tracking_uri: str, asked: str, remedy: str) -> None:
    """Refuse ``asked`` (what needs runs already recorded) on a sqlite store that does not
    exist, before opening it would create an empty one.

    Raises:
        ConfigError: naming what was asked, the missing file and ``remedy``.
    """
    database = sqlite_file(tracking_uri)
    if database is not None and not database.exists():
        raise ConfigError(f"{asked}: no MLflow store at {database}; {remedy}")


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
