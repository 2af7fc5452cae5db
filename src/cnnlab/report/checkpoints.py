"""A recorded run's trained model, rebuilt from its artifacts: the resolved config.yaml and
the best checkpoint the run names in its tag ``checkpoint.best``, loaded with
``weights_only=True`` (no code runs from the file)."""

from __future__ import annotations

import tempfile

import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf

from cnnlab.checks import ConfigError
from cnnlab.data.sources import DatasetInfo, dataset_info
from cnnlab.models import InputSpec, ModelConfig, Net, build_model
from cnnlab.tracking.record import BEST_CHECKPOINT_TAG


def load_run_model(client: MlflowClient, run_id: str) -> tuple[Net, DatasetInfo]:
    """The network of ``run_id`` with its best checkpoint's weights, in eval mode on CPU."""
    with tempfile.TemporaryDirectory() as folder:
        config_file = client.download_artifacts(run_id, "config.yaml", folder)
        best = client.get_run(run_id).data.tags.get(BEST_CHECKPOINT_TAG)
        if not best:
            raise ConfigError(
                f"run {run_id} has no best checkpoint to load (no {BEST_CHECKPOINT_TAG} tag)"
            )
        checkpoint_file = client.download_artifacts(run_id, best, folder)
        cfg = OmegaConf.load(config_file)
        state = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    schema = OmegaConf.structured(ModelConfig)
    model = OmegaConf.to_object(OmegaConf.merge(schema, cfg.model))
    info = dataset_info(cfg.data.name)
    net = build_model(model, InputSpec.of(info))
    weights = {
        key.removeprefix("net."): value
        for key, value in state["state_dict"].items()
        if key.startswith("net.")
    }
    try:
        net.load_state_dict(weights)
    except RuntimeError as error:  # a checkpoint of another model: say which, not a wall
        raise ConfigError(
            f"the checkpoint of run {run_id} does not fit model {model.name!r} of its "
            f"config.yaml: {str(error).splitlines()[1].strip()}"
        ) from error
    return net.eval(), info
