"""MLflow tracking: the only place that knows MLflow. The run's life cycle (runs), the store
reached (store), whether a run's writer lives (liveness), a store in trouble (retry), the
metrics Lightning logs (logger), recording a job (record), finding what to resume (resume)
and the sweep's parent run (sweep)."""

from mlflow.exceptions import MlflowException

from cnnlab.checks import redact_uri
from cnnlab.tracking.jobs import SWEEP_FILE, JobContext, job_context, write_outcome
from cnnlab.tracking.liveness import end_dead_runs, process_alive, process_tags, slurm_restarted
from cnnlab.tracking.logger import UNSENT_FILE, BatchedMLFlowLogger, send_unsent, unsent_steps
from cnnlab.tracking.models import log_model, register_best
from cnnlab.tracking.retry import StoreUnavailable
from cnnlab.tracking.runs import (
    TrackedRun,
    flatten_params,
    git_state,
    logged_steps,
    package_versions,
    unique_run_name,
)
from cnnlab.tracking.store import connect, open_experiment
from cnnlab.tracking.sweep import SweepCallback

# What the store raises for a request it refuses (a user error: a bad name, a bad URI).
USER_ERRORS = (MlflowException,)

__all__ = [
    "SWEEP_FILE",
    "UNSENT_FILE",
    "USER_ERRORS",
    "BatchedMLFlowLogger",
    "JobContext",
    "StoreUnavailable",
    "SweepCallback",
    "TrackedRun",
    "connect",
    "end_dead_runs",
    "flatten_params",
    "git_state",
    "job_context",
    "log_model",
    "logged_steps",
    "open_experiment",
    "package_versions",
    "process_alive",
    "process_tags",
    "redact_uri",
    "register_best",
    "send_unsent",
    "slurm_restarted",
    "unique_run_name",
    "unsent_steps",
    "write_outcome",
]
