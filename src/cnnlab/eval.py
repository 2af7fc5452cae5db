"""Test a trained model again and record the result beside its training run:
``python -m cnnlab.eval run=<run id> [ckpt=<file>] [data=... data.source=...] [trainer=...]``.

The model is rebuilt from what training recorded: the run's resolved ``config.yaml`` and its
best checkpoint (or ``ckpt=``), read with ``weights_only``. A checkpoint alone (``ckpt=``
without ``run=``) carries its model's knobs in its hyperparameters
(:class:`cnnlab.training.classifier.Classifier`), and the run that saved it is found by the
checkpoint's folder. Only where and on what it is tested may change: ``data``, ``trainer``
and ``perf``; the test runs on one device, so every image counts once.

The result goes into a new run nested under the trained one (tag ``cnnlab.role=eval``,
``eval.checkpoint``, ``eval.dataset``): the training run's metrics are never touched. As for
training, every check passes before that run exists, and a user error is one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cnnlab import compose, config, tracking
from cnnlab.checks import ConfigError, fail
from cnnlab.cli import USER_ERRORS
from cnnlab.data import DATASETS, ImageDataModule, dataset_info
from cnnlab.data.inputs import dataset_inputs
from cnnlab.launch.runtime import Runtime
from cnnlab.models import InputSpec
from cnnlab.tracking.runs import run_link
from cnnlab.tracking.store import require_store
from cnnlab.tracking.trained import EVAL_ROLE, Trained, check_file, find_trained
from cnnlab.training.classifier import Classifier, describing
from cnnlab.training.job import build_trainer, split_sizes
from cnnlab.training.perf import FastPath

log = logging.getLogger("cnnlab")

# A progress bar per artifact download (the checkpoint, config.yaml) is noise here.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Only the weights are wanted from the checkpoint: the callbacks that saved it do not test.
warnings.filterwarnings("ignore", ".*callbacks used to create the checkpoint need to be.*")

# What an evaluation may change of the trained run's settings: what it is tested on and
# where. logger and paths are this command's own (the store and folders of this machine).
CHANGEABLE = ("data", "trainer", "perf")
OWN = ("run", "ckpt", "logger", "paths", "hydra", "task_name")


@dataclass
class EvalConfig(config.TrainConfig):
    """``conf/eval.yaml``: the training schema, plus what is evaluated."""

    run: str | None = None  # the trained run's id
    ckpt: str | None = None  # a checkpoint file; default: the run's best (tag checkpoint.best)


def register() -> None:
    """conf/eval.yaml is conf/train.yaml plus ``run`` and ``ckpt``; train.yaml's schema
    (``train_schema``) is this process's :class:`EvalConfig`, so the two keys are typed."""
    compose.register_configs()
    ConfigStore.instance().store(name="train_schema", node=EvalConfig)


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override of the trained model (``model.pooling=avg``): an evaluation
    tests what was trained.

    Raises:
        ConfigError: naming the setting and what may be changed.
    """
    for override in OverridesParser.create().parse_overrides(overrides):
        top = override.key_or_group.split(".")[0].split("@")[0]
        if top not in CHANGEABLE + OWN:
            raise ConfigError(
                f"{override.input_line}: an evaluation tests the model as it was trained; "
                f"valid: run, ckpt, and settings of {', '.join(CHANGEABLE)}, logger, paths"
            )


def check_request(cfg: DictConfig, overrides: list[str]) -> None:
    """What the command line asks, checked before the store is opened (or created)."""
    check_overrides(overrides)
    if not cfg.run and not cfg.ckpt:
        raise ConfigError("nothing to evaluate; valid: run=<run id>, ckpt=<checkpoint file>")
    if cfg.ckpt:
        check_file(cfg.ckpt)


def connect(cfg: DictConfig) -> MlflowClient:
    """The store, which must exist already when a run is named (nothing is created)."""
    if cfg.run:
        require_store(
            cfg.logger.tracking_uri, f"run={cfg.run}",
            "point logger.tracking_uri (MLFLOW_TRACKING_URI) at the store it was recorded in",
        )  # fmt: skip
    return tracking.connect(cfg.logger.tracking_uri, cfg.logger.retry_s)


def settings_to_test(cfg: DictConfig, overrides: list[str], trained: Trained) -> DictConfig:
    """The trained run's config (for a checkpoint alone, this command's, with the
    checkpoint's model), with this command's changes to ``data``, ``trainer`` and ``perf``,
    its own logger and paths, on one device, over the whole test set.

    Raises:
        ConfigError: the recorded config or the checkpoint's model does not fit the schema.
    """
    try:
        return _settings_to_test(cfg, overrides, trained)
    except OmegaConfBaseException as error:  # e.g. a key this cnnlab no longer has
        first = str(error).splitlines()[0]
        raise ConfigError(
            f"{trained.name}: its settings do not fit this cnnlab ({first})"
        ) from error


def _settings_to_test(cfg: DictConfig, overrides: list[str], trained: Trained) -> DictConfig:
    schema = OmegaConf.structured(config.TrainConfig)
    if trained.config is not None:
        tested = OmegaConf.merge(schema, trained.config)
        # The whole test set, unless this command limits it (training's limits were its own).
        tested.trainer.update(limit_test_batches=None, fast_dev_run=False)
        apply_changes(tested, cfg, overrides)
    else:
        described = trained.described.get("model")
        if described is None:
            raise ConfigError(
                f"ckpt={trained.checkpoint} does not hold its model's settings (saved by an "
                "older cnnlab) and no run of this store saved it; valid: run=<the run's id>"
            )
        own = OmegaConf.masked_copy(cfg, [f.name for f in dataclasses.fields(config.TrainConfig)])
        tested = OmegaConf.merge(schema, own, {"model": described})
    tested.logger, tested.paths = cfg.logger, cfg.paths
    # One device: a DistributedSampler would pad the test set, counting images twice.
    tested.trainer.update(devices=1, num_nodes=1, strategy="auto")
    tested.test, tested.resume, tested.callbacks = True, None, {}
    return tested


def apply_changes(tested: DictConfig, cfg: DictConfig, overrides: list[str]) -> None:
    """This command's overrides of ``data``, ``trainer`` and ``perf``, onto the trained
    run's config: a group chosen (``data=fashion_mnist``) replaces the node, a setting
    (``data.source=bundled``) changes that setting."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.split(".")[0] in CHANGEABLE:
            OmegaConf.update(tested, key, OmegaConf.select(cfg, key), merge=False)


def check_shape(wanted: InputSpec, data_name: str) -> None:
    """The dataset must give the images and classes the model was built for.

    Raises:
        ConfigError: naming both shapes and the datasets that fit.
    """
    given = spec_of(data_name)
    if given != wanted:
        fitting = [name for name in DATASETS if spec_of(name) == wanted]
        raise ConfigError(
            f"data={data_name} gives {shape(given)}; the model takes {shape(wanted)}; "
            f"valid: {', '.join(fitting) or 'a dataset of that shape'}"
        )


def spec_of(data_name: str) -> InputSpec:
    return InputSpec.of(dataset_info(data_name))


def shape(spec: InputSpec) -> str:
    return f"{spec.channels}x{spec.size}x{spec.size} images of {spec.classes} classes"


@dataclass(frozen=True)
class Evaluation:
    """Everything built and checked: nothing is recorded yet."""

    trained: Trained
    settings: config.TrainConfig
    datamodule: ImageDataModule
    module: Classifier
    trainer: Any  # lightning.Trainer


def plan(cfg: DictConfig, runtime: Runtime, client: MlflowClient, into: Path) -> Evaluation:
    """Find, read and check what ``cfg`` names, and build what tests it.

    Raises:
        ConfigError, DataError: one line for the user, before any run exists.
    """
    trained = find_trained(client, cfg.run, cfg.ckpt, into)
    tested = settings_to_test(cfg, runtime.overrides, trained)
    tested.paths.output_dir = runtime.output_dir
    settings = config.to_settings(tested)
    spec = model_input(trained, settings)
    check_shape(spec, settings.data.name)
    datamodule = ImageDataModule(settings.data, shuffle_seed=settings.seed)
    datamodule.setup("test")
    module = Classifier(None, spec.classes, tta=settings.tta, **describing(settings.model, spec))
    try:  # the weights must fit the model: a checkpoint of another one is refused here
        module.load_state_dict(trained.state["state_dict"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{trained.name} does not fit the run's model ({first})") from error
    perf = settings.perf
    speed = FastPath(
        perf.memory_format.value, perf.compile, perf.compile_mode, perf.matmul_precision
    )
    trainer = build_trainer(settings, [speed], devices=None, logger=None)
    return Evaluation(trained, settings, datamodule, module, trainer)


def model_input(trained: Trained, settings: config.TrainConfig) -> InputSpec:
    """The input the model was built for: as its checkpoint says, or (an older checkpoint)
    as the trained run's dataset gives it."""
    described = trained.described.get("input_spec")
    if described is not None:
        return InputSpec(**described)
    if trained.config is None:
        raise ConfigError(f"ckpt={trained.checkpoint} does not say what input its model takes")
    return spec_of(str(trained.config.data.name))


def experiment_of(client: MlflowClient, evaluation: Evaluation) -> str:
    run = evaluation.trained.run
    if run is not None:
        return run.info.experiment_id
    logger = evaluation.settings.logger
    return tracking.open_experiment(client, logger.experiment_name, logger.artifact_location)


def eval_tags(evaluation: Evaluation, overrides: list[str]) -> dict[str, str]:
    trained, datamodule = evaluation.trained, evaluation.datamodule
    tags = {
        "cnnlab.role": EVAL_ROLE,
        "eval.checkpoint": trained.name,
        "eval.dataset": f"{datamodule.name} ({datamodule.source_used})",
        "overrides": tracking.redact_uri(" ".join(overrides)),
        "mlflow.source.name": "cnnlab.eval",
        **tracking.process_tags(),
        **tracking.git_state(config.REPO_ROOT),
    }
    if trained.run is not None:
        tags["mlflow.parentRunId"] = trained.run.info.run_id
    return tags


def record_evaluation(
    client: MlflowClient, evaluation: Evaluation, runtime: Runtime
) -> tuple[tracking.TrackedRun, dict[str, float]]:
    """Test in a new run (nested under the trained one): its data's settings as params,
    the config it tested, the test metrics."""
    trained, datamodule = evaluation.trained, evaluation.datamodule
    base = f"eval-{trained.run.info.run_name if trained.run else trained.checkpoint.stem}"
    experiment_id = experiment_of(client, evaluation)
    tracking.end_dead_runs(client, experiment_id)  # an evaluation killed outright (SIGKILL)
    name = tracking.unique_run_name(client, experiment_id, base)
    tracked = tracking.TrackedRun(
        client, experiment_id, name, eval_tags(evaluation, runtime.overrides)
    )
    with tracked as run:
        data = OmegaConf.to_container(
            OmegaConf.structured(evaluation.settings.data), enum_to_str=True
        )
        params = tracking.flatten_params({"data": data}) | split_sizes(datamodule)
        run.log_params(params | {"data/source_resolved": str(datamodule.source_used)})
        run.log_datasets(d for d in dataset_inputs(datamodule) if d["context"] == "test")
        resolved = OmegaConf.to_yaml(OmegaConf.structured(evaluation.settings))
        run.log_text(tracking.redact_uri(resolved), "config.yaml")
        results = evaluation.trainer.test(
            evaluation.module, datamodule=datamodule, ckpt_path=str(trained.checkpoint),
            weights_only=True,
        )  # fmt: skip
        metrics = {key: float(value) for key, value in results[0].items()}
        for key, value in metrics.items():
            run.log_metric(key, value)
    return tracked, metrics


def run(cfg: DictConfig) -> float:
    """Evaluate what ``cfg`` names and record it; returns the test accuracy."""
    runtime = Runtime.from_hydra()
    with tempfile.TemporaryDirectory(prefix="cnnlab-eval-") as into:
        try:
            check_request(cfg, runtime.overrides)
            client = connect(cfg)
            evaluation = plan(cfg, runtime, client, Path(into))
        except USER_ERRORS as error:
            fail(error)
        tracked, metrics = record_evaluation(client, evaluation, runtime)
    accuracy = metrics.get("test/acc", float("nan"))
    tags = tracked.run.data.tags
    link = run_link(client.tracking_uri, tracked.run.info.experiment_id, tracked.run_id)
    print(
        f"test accuracy: {accuracy:.2%} ({tags['eval.checkpoint']} on {tags['eval.dataset']})",
        f"MLflow run: {tracked.run_id} ({tracked.run.info.run_name})",
        f"open it: {link}",
        sep="\n",
        flush=True,
    )
    return accuracy


register()


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
