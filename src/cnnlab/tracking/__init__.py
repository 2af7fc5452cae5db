"""MLflow tracking: the only place besides the entry points that knows MLflow."""

from cnnlab.tracking.logger import BatchedMLFlowLogger
from cnnlab.tracking.runs import (
    TrackedRun,
    flatten_params,
    git_state,
    open_experiment,
    package_versions,
    redact_uri,
    unique_run_name,
)

__all__ = [
    "BatchedMLFlowLogger",
    "TrackedRun",
    "flatten_params",
    "git_state",
    "open_experiment",
    "package_versions",
    "redact_uri",
    "unique_run_name",
]
