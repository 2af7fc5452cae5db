"""MLflow tracking: the only place besides the entry points that knows MLflow."""

from cnnlab.tracking.logger import BatchedMLFlowLogger
from cnnlab.tracking.runs import (
    TrackedRun,
    connect,
    flatten_params,
    git_state,
    logged_steps,
    open_experiment,
    package_versions,
    redact_uri,
    unique_run_name,
)
from cnnlab.tracking.sweep import SWEEP_FILE, JobContext, SweepCallback, job_context

__all__ = [
    "SWEEP_FILE",
    "BatchedMLFlowLogger",
    "JobContext",
    "SweepCallback",
    "TrackedRun",
    "connect",
    "flatten_params",
    "git_state",
    "job_context",
    "logged_steps",
    "open_experiment",
    "package_versions",
    "redact_uri",
    "unique_run_name",
]
