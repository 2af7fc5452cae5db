"""airbench94's recipe as cnnlab knobs (`experiment=speedrun`), piece by piece on the CPU:
the whitening's eigen-decomposition, the net's layout and initialization, the optimizer's
groups and decoupled decay, the schedule, lookahead, test-time augmentation, reflect crops,
alternating flips, drop_last, and the timer; then all of them together in one real fit.
Accuracy is not tested: there are no CIFAR-10 files here (README, "Speed")."""

from __future__ import annotations

import itertools

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import DummyLogger
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.data import ImageDataModule
from cnnlab.data.augment import AlternatingFlip, crop_flip
from cnnlab.data.config import DataConfig
from cnnlab.models import InputSpec, build_model
from cnnlab.models.tta import TTA
from cnnlab.models.whitening import PatchWhitening
from cnnlab.training.job import fit_and_test, planned_steps, prepare, start_from
from cnnlab.training.lookahead import Lookahead
from cnnlab.training.optim import PiecewiseLinear, grouped_sgd, piecewise_linear
from tests.conftest import compose_train, only_run, write_cifar

CIFAR = InputSpec(3, 32, 10)

# -- the whitening layer ---------------------------------------------------------------------


def patch_covariance_by_loops(images: np.ndarray, kernel: int) -> np.ndarray:
    """The uncentered covariance of every kernel x kernel patch, each flattened as (C, k, k),
    by plain loops: the reference the vectorized code is checked against."""
    patches = [
        image[:, row : row + kernel, col : col + kernel].reshape(-1)
        for image in images
        for row in range(images.shape[2] - kernel + 1)
        for col in range(images.shape[3] - kernel + 1)
    ]
    flat = np.stack(patches).astype(np.float64)
    return flat.T @ flat / len(flat)


@pytest.mark.parametrize(("channels", "kernel"), [(3, 2), (1, 3)])
def test_whitening_filters_invert_the_patch_covariance(channels: int, kernel: int) -> None:
    generator = torch.Generator().manual_seed(0)
    # correlated channels and neighbouring pixels, as in images: a smoothed random field
    images = torch.randn(6, channels, 9, 9, generator=generator)
    images = nn.functional.avg_pool2d(images, 3, 1, padding=1) + 0.3 * images.mean(1, True)
    layer = PatchWhitening(channels, kernel, eps=1e-3)
    layer.fit(images)

    covariance = patch_covariance_by_loops(images.numpy(), kernel)
    dims = channels * kernel * kernel
    weight = layer.conv.weight.detach().double().reshape(2 * dims, dims).numpy()
    plus, minus = weight[:dims], weight[dims:]
    np.testing.assert_allclose(minus, -plus)
    # rows v_i / sqrt(l_i + eps): whatever each eigenvector's sign, W^T W = (C + eps I)^-1
    np.testing.assert_allclose(
        plus.T @ plus, np.linalg.inv(covariance + 1e-3 * np.eye(dims)), rtol=2e-3, atol=2e-3
    )
    # the largest eigenvalue's filter first (the smallest norm), as airbench orders them
    norms = (plus**2).sum(axis=1)
    assert np.all(np.diff(norms) >= -1e-6 * norms.max())
    expected = 1 / (np.linalg.eigvalsh(covariance)[::-1] + 1e-3)
    np.testing.assert_allclose(norms, expected, rtol=2e-3)


def test_the_whitened_patches_are_uncorrelated_with_unit_variance() -> None:
    images = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    images[:, 1] = images[:, 0] * 0.9 + images[:, 1] * 0.1  # two channels nearly equal
    layer = PatchWhitening(3, 2, eps=1e-6)
    layer.fit(images)
    with torch.no_grad():
        out = nn.functional.conv2d(images, layer.conv.weight[:12])  # the + half, no bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    # diag(l / (l + eps)), largest eigenvalue first: 1 but for the smallest eigenvalues
    eigenvalues = np.linalg.eigvalsh(patch_covariance_by_loops(images.numpy(), 2))[::-1]
    expected = torch.diag(torch.from_numpy(eigenvalues / (eigenvalues + 1e-6)).double())
    torch.testing.assert_close(covariance, expected, atol=2e-3, rtol=0)


# -- the net ---------------------------------------------------------------------------------


def test_the_speedrun_net_is_airbench94s_layout() -> None:
    net = build_model("speedrun", CIFAR)
    stem = net.backbone.stem
    assert isinstance(stem.whiten, PatchWhitening) and stem.whiten.conv.out_channels == 24
    assert not stem.whiten.conv.weight.requires_grad and stem.whiten.bias.requires_grad
    stage = net.backbone.stage2
    names = [name for name, _ in stage.body.named_children()]
    assert names == ["conv1", "pool", "norm1", "act1", "conv2", "norm2"]  # then stage.act
    assert isinstance(stage.pool, nn.Identity)  # pooled inside, after the first conv
    for conv in (stage.body.conv1, stage.body.conv2):
        assert conv.bias is None
    for norm in (stage.body.norm1, stage.body.norm2):
        assert (norm.eps, norm.momentum) == (1e-12, 0.4)
        assert not norm.weight.requires_grad and norm.bias.requires_grad
    classifier = net.head.head.classifier.mlp[0]
    assert classifier.bias is None and net.head.scale == pytest.approx(1 / 9)
    assert isinstance(net.head.head.pool, nn.AdaptiveMaxPool2d)
    assert [size for _, size in net.layer_sizes] == [31, 31, 15, 15, 15, 7, 7, 7, 3, 3]


def test_dirac_initialization_passes_the_input_through() -> None:
    net = build_model("speedrun", CIFAR)
    conv = net.backbone.stage2.body.conv1  # 64 -> 256 maps
    x = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y[:, :64], x)  # the first 64 filters are identities
    assert not torch.allclose(y[:, 64:128], x)  # the others stay random
    default = build_model("speedrun", CIFAR, init="default").backbone.stage2.body.conv1
    with torch.no_grad():
        assert not torch.allclose(default(x)[:, :64], x)


def test_pool_first_cannot_go_with_a_skip_connection() -> None:
    with pytest.raises(ConfigError, match=r"model.residual=true with model.pool_first=true"):
        build_model("cnn", CIFAR, residual=True, pool_first=True)


# -- optimizer and schedule ------------------------------------------------------------------


def test_grouped_sgd_gives_batchnorm_shifts_their_own_rate_and_decouples_the_decay() -> None:
    net = build_model("speedrun", CIFAR, channels=[8, 8, 8])
    optimizer = grouped_sgd(
        net, lr=0.5, weight_decay=0.1, decoupled_weight_decay=True, norm_bias_lr_scale=64
    )
    shifts = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    norm_group, other_group = optimizer.param_groups
    assert {id(p) for p in norm_group["params"]} == shifts
    assert (norm_group["lr"], other_group["lr"]) == (32.0, 0.5)
    frozen = {id(p) for p in net.parameters() if not p.requires_grad}
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert frozen and not frozen & grouped  # frozen weights are in no group
    assert grouped | frozen == {id(p) for p in net.parameters()}
    # one step without gradient: each weight loses weight_decay of itself, in either group
    weights = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in weights]
    for p in weights:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, old in zip(weights, before, strict=True):
        torch.testing.assert_close(p.detach(), old * 0.9)


def test_coupled_weight_decay_is_torchs() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    optimizer = grouped_sgd(net, lr=0.5, weight_decay=0.1, norm_bias_lr_scale=2)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.1]


def test_the_piecewise_linear_schedule_passes_through_its_knots() -> None:
    schedule = PiecewiseLinear(100, [[0.0, 0.2], [0.23, 1.0], [1.0, 0.07]])
    assert [schedule(step) for step in (0, 23, 100)] == pytest.approx([0.2, 1.0, 0.07])
    assert schedule(11.5) == pytest.approx(0.6)  # halfway up
    assert schedule(200) == pytest.approx(0.07)  # held after the end
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0, momentum=0.85)
    scheduler = piecewise_linear(optimizer, total_steps=100, knots=[[0, 0.2], [0.23, 1], [1, 0.07]])
    rates = []
    for _ in range(101):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.4) and rates[23] == pytest.approx(2.0)
    assert rates[100] == pytest.approx(0.14)
    assert optimizer.param_groups[0]["momentum"] == 0.85  # fixed: nothing cycles it


@pytest.mark.parametrize(
    "knots", [[[0.1, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.9, 0.0]], [[0.0, 1.0], [0.5, 1], [0.2, 1]]]
)
def test_knots_that_do_not_span_the_run_are_refused(knots) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"scheduler.knots=.*from fraction 0 to fraction 1"):
        piecewise_linear(optimizer, total_steps=10, knots=knots)


def test_a_bad_schedule_is_one_line_before_any_run(small_cfg) -> None:
    with pytest.raises(ConfigError, match=r"optimizer or scheduler settings refused: .*knots"):
        prepare(small_cfg(["scheduler=piecewise_linear", "scheduler.knots=[[0,1],[0.5,1]]"]))


# -- lookahead -------------------------------------------------------------------------------


def test_lookahead_pulls_the_weights_to_their_average() -> None:
    net = nn.Linear(2, 1, bias=False)
    lookahead = Lookahead(every=5, decay=0.95, power=3)
    lookahead.track(net)
    lookahead.total_steps = 100
    assert lookahead.rate(0) == 0 and lookahead.rate(100) == pytest.approx(0.95**5)
    assert lookahead.rate(50) == pytest.approx(0.95**5 * 0.125)
    lookahead.average = {"weight": torch.zeros(1, 2)}
    with torch.no_grad():
        net.weight.fill_(1.0)
    lookahead.pull(0.75)  # average = 0.75 * 0 + 0.25 * 1; weights = average
    torch.testing.assert_close(net.weight.detach(), torch.full((1, 2), 0.25))
    torch.testing.assert_close(lookahead.average["weight"], torch.full((1, 2), 0.25))
    with torch.no_grad():
        net.weight.fill_(3.0)
    lookahead.pull(1.0)  # the end: the weights become the average
    torch.testing.assert_close(net.weight.detach(), torch.full((1, 2), 0.25))


@pytest.mark.parametrize("settings", [dict(every=0), dict(decay=1.5), dict(power=-1)])
def test_lookahead_settings_out_of_range_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError, match="valid: every >= 1, decay in"):
        Lookahead(**settings)


# -- test-time augmentation ------------------------------------------------------------------


def test_test_time_augmentation_weighs_its_six_views_as_airbench() -> None:
    torch.manual_seed(0)
    net = build_model("cnn", CIFAR, channels=[4, 4]).eval()
    images = torch.randn(3, 3, 32, 32)
    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    views = {
        "image": images,
        "moved up-left": padded[..., :32, :32],
        "moved down-right": padded[..., 2:, 2:],
    }
    with torch.no_grad():
        logits = {name: (net(v), net(v.flip(-1))) for name, v in views.items()}
        expected = 0.25 * sum(logits["image"]) + 0.125 * sum(
            logits["moved up-left"] + logits["moved down-right"]
        )
        torch.testing.assert_close(TTA["flip_translate"](net, images), expected)
        torch.testing.assert_close(TTA["flip"](net, images), 0.5 * sum(logits["image"]))
        torch.testing.assert_close(TTA["none"](net, images), logits["image"][0])
    # moved one pixel: the view's pixel (i, j) is the image's (i - 1, j - 1)
    torch.testing.assert_close(views["moved up-left"][..., 1:, 1:], images[..., :-1, :-1])


# -- data: reflect crops, alternating flips, drop_last -----------------------------------------


def test_a_reflect_crop_is_a_window_of_the_reflected_image() -> None:
    torch.manual_seed(0)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    padded = nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    crops = crop_flip(images, padding=2, fill="reflect", flip=False)
    windows = [padded[..., r : r + 8, c : c + 8] for r, c in itertools.product(range(5), range(5))]
    for i in range(len(images)):
        assert any(torch.equal(crops[i], window[i]) for window in windows)
    torch.testing.assert_close(crop_flip(images, padding=0, flip=False), images)


def test_alternating_flips_mirror_each_image_every_other_epoch() -> None:
    class Epoch:
        epoch = 0

    sampler = Epoch()
    images = torch.zeros(200, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, :, 0] = 1  # the left column lit: mirrored, the right one
    flip = AlternatingFlip(200, seed=3, device=torch.device("cpu"), sampler=sampler)
    index = torch.arange(200)
    mirrored = []
    for epoch in range(3):
        sampler.epoch = epoch
        mirrored.append(flip(images, index)[:, 0, 0, 0] == 0)
    assert 70 < int(mirrored[0].sum()) < 130  # about half, drawn once
    assert torch.equal(mirrored[1], ~mirrored[0]) and torch.equal(mirrored[2], mirrored[0])
    again = AlternatingFlip(200, seed=3, device=torch.device("cpu"), sampler=sampler)
    assert torch.equal(again.even, flip.even)  # the seed decides


def test_drop_last_keeps_every_step_the_same_shape(tmp_path, skip_cifar_checksums) -> None:
    root = write_cifar(tmp_path / "data", train=500, test=20)
    config = DataConfig(name="cifar10", root=str(root), val_size=100, batch_size=64, drop_last=True)
    datamodule = ImageDataModule(config)
    datamodule.setup("fit")
    sizes = [len(labels) for _, labels in datamodule.train_dataloader()]
    assert sizes == [64] * 6  # 400 images: 6 whole batches, 16 left for a later epoch
    assert planned_steps({"max_epochs": 2}, 400, 64, 1, drop_last=True) == 12
    assert planned_steps({"max_epochs": 2}, 400, 64, 1) == 14
    with pytest.raises(ConfigError, match=r"data.drop_last=true drops every batch.*<= 400"):
        planned_steps({"max_epochs": 1}, 400, 512, 1, drop_last=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(name="mnist", augment=True, flip="alternating"),
         r"data.flip=alternating: a setting of the crop-and-flip .* mnist augments with affine"),
        (dict(name="cifar10", crop_padding=2),
         r"data.crop_padding=2: .* but data.augment is false"),
        (dict(name="cifar10", augment=True, crop_fill="reflect", crop_padding=32),
         r"data.crop_padding=32 with data.crop_fill=reflect: .* valid: 0 to 31"),
    ],
)  # fmt: skip
def test_crop_and_flip_settings_that_cannot_apply_are_refused(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ImageDataModule(DataConfig(**settings))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.flip=sometimes", r"unknown data.flip 'sometimes'; valid: alternating, none, random"),
        ("data.crop_fill=edge", r"unknown data.crop_fill 'edge'; valid: reflect, zeros"),
        ("tta=six", r"unknown tta 'six'; valid: flip, flip_translate, none"),
        ("model.norm_momentum=1.5", r"model.norm_momentum=1.5"),
        ("model.whiten=-1", r"model.whiten=-1"),
        ("model.init=orthogonal", r"unknown init 'orthogonal'; valid: default, dirac"),
    ],
)
def test_bad_recipe_settings_are_refused_before_training(small_cfg, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare(small_cfg([override]))


# -- all of it in one fit --------------------------------------------------------------------


class Probe(L.Callback):
    """What the recipe's callbacks did, seen from outside: the whitening's weight after its
    fit and after each epoch, and the epochs in which its bias had a gradient to step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.bias_trained_in: set[int] = set()

    def _look(self, pl_module) -> None:
        self.weights.append(pl_module.net.backbone.stem.whiten.conv.weight.detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if pl_module.net.backbone.stem.whiten.bias.grad is not None:
            self.bias_trained_in.add(trainer.current_epoch)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._look(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._look(pl_module)


def speedrun(tmp_path, root, folder: str, *overrides: str):
    """experiment=speedrun on the CPU at a tiny size: CIFAR fixture files under ``root``, a
    narrow net, whole epochs (no max_steps), one validation batch."""
    return compose_train(
        ["experiment=speedrun", "trainer=default", "trainer.max_steps=-1",
         "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
         "data.val_size=100", f"data.root={root}", f"paths.log_dir={tmp_path}/logs",
         f"paths.root_dir={tmp_path}", *overrides],
        tmp_path / folder,
    )  # fmt: skip


def test_the_speedrun_recipe_trains_as_airbench_on_the_cpu(
    tmp_path, tracking_uri: str, skip_cifar_checksums
) -> None:
    root = write_cifar(tmp_path / "data", train=600, test=40)
    cfg = speedrun(
        tmp_path, root, "run", "trainer.max_epochs=3", "data.batch_size=64",
        "data.eval_batch_size=64", "model.channels=[8,16,16]", "model.whiten_images=50",
        "model.whiten_bias_epochs=1",
    )  # fmt: skip
    job = prepare(cfg, logger=DummyLogger())
    probe = Probe()
    job.trainer.callbacks.append(probe)  # after cnnlab's: sees what they did
    result = fit_and_test(job)
    assert result.step == 3 * 7  # 500 images, batch 64, the last 52 dropped: 7 steps an epoch

    # whitening: fitted once, to the first 50 training images as normalized, never trained
    images = job.datamodule.normalize(job.datamodule.train_set.images[:50])
    expected = PatchWhitening(3, 2, eps=5e-4)
    expected.fit(images)
    flat = [w.reshape(24, 12)[:12] for w in (probe.weights[0], expected.conv.weight)]
    torch.testing.assert_close(flat[0].T @ flat[0], flat[1].T @ flat[1])  # signs aside
    assert all(torch.equal(w, probe.weights[0]) for w in probe.weights)
    assert len(probe.weights) == 4  # after the fit and each of the 3 epochs
    assert probe.bias_trained_in == {0}  # its bias trained in the first epoch only

    # the tested weights are lookahead's average, saved in the last checkpoint
    lookahead = next(c for c in job.trainer.callbacks if isinstance(c, Lookahead))
    for name, value in job.net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, lookahead.average[name])
    state = torch.load(job.trainer.checkpoint_callback.best_model_path, weights_only=True)
    tested = state["state_dict"]["net.backbone.stage3.body.conv2.weight"]
    torch.testing.assert_close(tested, job.net.backbone.stage3.body.conv2.weight.detach())
    average = next(v for k, v in state["callbacks"].items() if k.startswith("Lookahead"))
    assert "backbone.stage1.body.norm1.running_mean" in average["average"]

    # the optimizer: batchnorm shifts at 64x, momentum fixed, schedule at its end
    optimizer = job.trainer.optimizers[0]
    norm_group, other_group = optimizer.param_groups
    assert norm_group["initial_lr"] == pytest.approx(64 * other_group["initial_lr"])
    assert other_group["lr"] == pytest.approx(1.5 * 0.07)
    assert other_group["momentum"] == 0.85 and other_group["nesterov"]
    assert job.module.predict_views is TTA["flip_translate"]
    assert result.test_acc is not None


def test_the_timer_and_the_recipe_are_recorded_in_mlflow(
    tmp_path, tracking_uri: str, skip_cifar_checksums
) -> None:
    from cnnlab import train

    root = write_cifar(tmp_path / "data", train=300, test=40)
    cfg = speedrun(
        tmp_path, root, "run", "trainer.max_epochs=2", "data.batch_size=50",
        "data.eval_batch_size=64", "model.channels=[8,8,8]", "model.whiten_images=20",
    )  # fmt: skip
    train.run(cfg)
    client, run = only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    seconds = run.data.metrics["time/train_s"]
    epochs = client.get_metric_history(run.info.run_id, "time/epoch_s")
    # training and the whitening fit: more than the training batches, less than the fit
    assert sum(m.value for m in epochs) <= seconds <= run.data.metrics["time/fit_s"]
    params = run.data.params
    assert (params["tta"], params["data/flip"], params["data/crop_fill"]) == (
        "flip_translate", "alternating", "reflect"
    )  # fmt: skip
    assert params["optimizer/norm_bias_lr_scale"] == "64"


class StopAfterEpoch(L.Callback):
    """Stops the fit at the end of epoch ``epoch``, once its checkpoint is saved: what a
    kill between epochs leaves."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_speedrun_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(
    tmp_path, skip_cifar_checksums
) -> None:
    """Lookahead's average, the timer's seconds, the fitted whitening and its frozen bias
    all come back from the checkpoint: the resumed fit ends with the same weights."""
    root = write_cifar(tmp_path / "data", train=400, test=20)

    def job(name: str, start=None):
        cfg = speedrun(
            tmp_path, root, name, "trainer.max_epochs=3", "trainer.deterministic=true",
            "data.batch_size=50", "model.channels=[4,8,8]", "model.whiten_images=20",
            "model.whiten_bias_epochs=1", "test=false",
        )  # fmt: skip
        return prepare(cfg, start=start, logger=DummyLogger())

    whole = job("whole")
    fit_and_test(whole)
    first = job("first")
    first.trainer.callbacks.append(StopAfterEpoch(0))
    fit_and_test(first)
    checkpoint = tmp_path / "first/checkpoints/last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]
    assert any(key.startswith("Lookahead") for key in saved)
    assert saved["TrainTimer"]["seconds"] > 0
    resumed = job("first", start_from(checkpoint))
    timer = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "TrainTimer")
    result = fit_and_test(resumed)
    assert result.step == whole.trainer.global_step == 18
    assert timer.seconds_before == saved["TrainTimer"]["seconds"]
    for name, value in whole.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[name], value, msg=name)
