"""Hydra composition: the schemas registered in Hydra's ConfigStore, and ``conf/train.yaml``
composed from Python (notebooks, benchmarks, tests) as ``python -m cnnlab.train`` composes it.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from cnnlab.config import CONF_DIR, TrainConfig
from cnnlab.models import PRESETS, preset

HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"  # paths.output_dir, as conf/ sets it


def _sweep_batch(fail_fast: bool) -> int | None:
    """Jobs per launch batch: Hydra re-raises a job's failure only after its batch ends."""
    return 1 if fail_fast else None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``train_schema`` (listed first by
    conf/train.yaml) and one ``model`` group option per preset in cnnlab.models.PRESETS."""
    if not OmegaConf.has_resolver("cnnlab_sweep_batch"):
        OmegaConf.register_new_resolver("cnnlab_sweep_batch", _sweep_batch)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in PRESETS:
        store.store(group="model", name=name, node=preset(name))


def recompose(config_name: str, overrides: list[str]) -> DictConfig:
    """``config_name`` composed again with ``overrides`` (no ``hydra`` node), inside a Hydra
    app or outside one (a config built by :func:`compose`, whose Hydra has closed)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def compose(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` composed as ``python -m cnnlab.train`` would,
    writing into ``output_dir``, for Python (notebooks, benchmarks, tests). The result needs
    no Hydra runtime: ``paths.output_dir`` is set to ``output_dir``, so
    ``training.prepare(config.to_settings(cfg))`` works as it is. Hydra's runtime is set as
    well, for the entry point :func:`cnnlab.train.run`, which reads it."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if cfg.paths._get_node("output_dir")._value() == HYDRA_OUTPUT_DIR:  # not overridden
            cfg.paths.output_dir = str(output_dir)
    return cfg
