"""perf.*: the memory format measured or set, torch.compile, label smoothing; the results
of a run do not depend on them beyond rounding."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.loggers.logger import DummyLogger

from cnnlab import train
from cnnlab.checks import ConfigError
from cnnlab.models import InputSpec, build_model
from cnnlab.training import perf
from cnnlab.training.job import fit_and_test, prepare
from tests.conftest import compose_train, only_run, write_cifar


def fit(job) -> float:
    job.trainer.logger = DummyLogger()  # cnnlab.train gives it MLflow's; not needed here
    return fit_and_test(job).best_val


@pytest.fixture
def cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(perf, "_chosen", {})
    return tmp_path / "cache" / "perf.json"


def test_the_faster_memory_format_is_measured_once_and_remembered(cache, monkeypatch) -> None:
    net = build_model("lenet5", InputSpec(1, 28, 10), batchnorm=False)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randn(64, 1, 28, 28)
    rng = torch.get_rng_state()
    choice = perf.faster_format(net, images, torch.device("cpu"))
    assert choice in perf.MEMORY_FORMATS
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert list(json.loads(cache.read_text()).values()) == [choice]

    def measure_again(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(perf, "_measure", measure_again)
    monkeypatch.setattr(perf, "_chosen", {})  # a new process: the file remembers
    assert perf.faster_format(net, images, torch.device("cpu")) == choice
    # Another model is another question; a GPU takes channels_last without measuring.
    with pytest.raises(AssertionError, match="measured again"):
        perf.faster_format(build_model("lenet5", InputSpec(1, 28, 10)), images, torch.device("cpu"))
    assert perf.faster_format(net, images, torch.device("cuda")) == "channels_last"


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
def test_a_run_trains_in_the_memory_format_it_is_given(small_cfg, memory_format) -> None:
    job = prepare(small_cfg([f"perf.memory_format={memory_format}", "test=false"]))
    fit(job)
    conv = job.net.backbone.stage1.body.conv1.weight
    layout = perf.MEMORY_FORMATS[memory_format]
    assert conv.is_contiguous(memory_format=layout)
    assert job.module.memory_format == layout
    # Its checkpoints load into a model of either layout: the state is the same tensors.
    state = torch.load(job.trainer.checkpoint_callback.last_model_path, weights_only=True)
    fresh = build_model("lenet5", InputSpec(1, 28, 10))
    fresh.load_state_dict({k.removeprefix("net."): v for k, v in state["state_dict"].items()})


def test_auto_takes_no_timing_dependent_choice_for_a_deterministic_run(small_cfg, cache) -> None:
    job = prepare(small_cfg(["trainer.deterministic=true", "test=false"]))
    fit(job)
    fast_path = next(c for c in job.trainer.callbacks if isinstance(c, perf.FastPath))
    assert fast_path.memory_format == "contiguous"
    assert not cache.exists()  # nothing was measured


def test_auto_on_one_process_measures_on_a_cold_cache_and_applies_its_choice(
    small_cfg, cache
) -> None:
    job = prepare(small_cfg(["perf.memory_format=auto", "test=false"]))
    fit(job)
    fast_path = next(c for c in job.trainer.callbacks if isinstance(c, perf.FastPath))
    assert list(json.loads(cache.read_text()).values()) == [fast_path.memory_format]
    layout = perf.MEMORY_FORMATS[fast_path.memory_format]
    assert job.net.backbone.stage2.body.conv1.weight.is_contiguous(memory_format=layout)
    assert job.module.memory_format == layout


def test_label_smoothing_softens_the_training_loss_only(small_cfg) -> None:
    job = prepare(small_cfg(["label_smoothing=0.2"]))
    assert job.module.criterion.label_smoothing == 0.2
    assert job.module.eval_criterion.label_smoothing == 0.0


@pytest.mark.slow
def test_a_compiled_model_trains_and_saves_plain_state(small_cfg) -> None:
    job = prepare(small_cfg(["perf.compile=true", "perf.memory_format=contiguous", "test=false"]))
    best_val = fit(job)
    assert best_val == best_val  # a number: it trained and validated
    assert job.net._compiled_call_impl is not None
    state = torch.load(job.trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert not [k for k in state["state_dict"] if "_orig_mod" in k]


def test_trainer_gpu_asks_for_bf16_on_one_gpu(small_cfg) -> None:
    trainer = small_cfg(["trainer=gpu"]).trainer
    assert (trainer.accelerator, trainer.devices) == ("gpu", 1)
    assert (trainer.precision, trainer.benchmark) == ("bf16-mixed", True)
    if not torch.cuda.is_available():  # here: refused in one line, before any run
        with pytest.raises(ConfigError, match="refused: No supported gpu backend"):
            prepare(small_cfg(["trainer=gpu"]))


def test_the_speedrun_experiment_runs_its_whole_path_at_tiny_size_on_cpu(
    tmp_path, tracking_uri: str, skip_cifar_checksums
) -> None:
    """experiment=speedrun as on a GPU (bf16 autocast, the speedrun net, SGD + one-cycle,
    label smoothing, crop/flip augmentation, a measured memory format), on the CPU."""
    root = write_cifar(tmp_path / "data", train=1000, test=100)
    cfg = compose_train(
        ["experiment=speedrun", "trainer.accelerator=cpu", "trainer.benchmark=false",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         "data.batch_size=16", "data.eval_batch_size=32", "data.val_size=100",
         f"data.root={root}", f"paths.log_dir={tmp_path}/logs", f"paths.root_dir={tmp_path}"],
        tmp_path / "run",
    )  # fmt: skip
    train.run(cfg)
    _, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model/name"], params["trainer/precision"]) == ("speedrun", "bf16-mixed")
    assert (params["label_smoothing"], params["data/augment"]) == ("0.2", "True")
    assert params["optimizer/nesterov"] == "True"
