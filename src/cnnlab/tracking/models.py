"""The MLflow model flavor: a run's trained model logged as ``runs:/<id>/model`` (torch's
``pt2`` export: a graph and weights, no pickle, loadable without cnnlab), and a sweep's best
run registered as a model version with the alias ``best``."""

from __future__ import annotations

import logging
import time

import mlflow
import mlflow.pytorch
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature
from torch import Tensor, nn

from cnnlab.checks import ConfigError
from cnnlab.tracking.continuation import REUSED_TAG
from cnnlab.tracking.fluent import fluent_store
from cnnlab.tracking.runs import TrackedRun

log = logging.getLogger("cnnlab")

MODEL_ARTIFACT = "model"
BEST_ALIAS = "best"
MODEL_TAG = "cnnlab.model"  # the run's logged model: runs:/<id>/model


def requirements() -> list[str]:
    """What loading the model needs: torch (and MLflow, which MLflow adds). Named here
    because MLflow's own inference loads the model in a new process: ~10 s a run."""
    return [f"torch=={torch.__version__.split('+')[0]}"]


def log_model(run: TrackedRun, model: nn.Module, example: Tensor) -> str:
    """Log ``model`` (taking ``example``'s kind of batch) into ``run`` as the MLflow pytorch
    flavor, exported with ``torch.export``; returns its ``runs:/`` URI."""
    start = time.perf_counter()
    with torch.no_grad():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    # MLflow's fluent API logs the model; its store and experiment must be the run's (it
    # would put the model in the default experiment, given only the run's id).
    with fluent_store(run.client.tracking_uri, run.run.info.experiment_id):
        mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            run_id=run.run_id,
            signature=signature,
            input_example=example.numpy(),
            serialization_format="pt2",
            pip_requirements=requirements(),
        )
    uri = f"runs:/{run.run_id}/{MODEL_ARTIFACT}"
    run.client.set_tag(run.run_id, MODEL_TAG, uri)
    log.info("model logged as %s in %.1f s", uri, time.perf_counter() - start)
    return uri


def best_run_of(jobs: pd.DataFrame, group: str, score: str) -> str:
    """The id of the run that trained the best finished job of ``group`` (by ``score``): a
    reused job's model is in the run it reused."""
    done = jobs[(jobs["status"] == "FINISHED") & (jobs["tags.group"] == group)]
    best = done.loc[done[score].idxmax()]
    reused = best.get(f"tags.{REUSED_TAG}")
    return reused if isinstance(reused, str) and reused else best["run_id"]


def register_best(client: MlflowClient, run_id: str, name: str) -> tuple[str, str]:
    """Register run ``run_id``'s logged model as a new version of ``name`` and point the
    alias ``best`` at it; returns ``models:/<name>@best`` and the version.

    Raises:
        ConfigError: the run has no logged model.
    """
    run = client.get_run(run_id)
    if MODEL_TAG not in run.data.tags:
        raise ConfigError(
            f"sweep.register_best={name}: the best run {run_id} ({run.info.run_name}) has no "
            "logged model: it was trained by an earlier start without sweep.register_best or "
            "logger.log_model; train it again (sweep.reuse=false, a new sweep) to register it"
        )
    with fluent_store(client.tracking_uri):
        version = mlflow.register_model(run.data.tags[MODEL_TAG], name)
    try:
        client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    except BaseException:  # a version no alias points at would only mislead: take it back
        client.delete_model_version(name, version.version)
        raise
    return f"models:/{name}@{BEST_ALIAS}", str(version.version)
