"""Models: output-size arithmetic, pooling numerics, preset parameter counts, every knob
combination trains (forward and backward), and bad knobs are refused with the valid ones."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from cnnlab.checks import ConfigError
from cnnlab.models import PRESETS, InputSpec, ModelConfig, ShapeError, Window, build_model
from cnnlab.models.heads import HEADS
from cnnlab.models.layers import ACTIVATIONS, CONVS
from cnnlab.models.pooling import POOLINGS, GeMPool, MixedPool, make_pooling
from cnnlab.models.summary import describe

MNIST = InputSpec(channels=1, size=28, classes=10)
CIFAR = InputSpec(channels=3, size=32, classes=10)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# -- output sizes: O = (W + 2P - F) / S + 1 ------------------------------------------------


@pytest.mark.parametrize(("stride", "expected"), [(1, 5), (2, 3)])
def test_output_size_formula(stride: int, expected: int) -> None:
    assert Window(kernel=3, stride=stride).out_size(7) == expected


def test_output_size_not_exact_is_an_error_naming_layer_input_and_window() -> None:
    with pytest.raises(ShapeError, match=r"conv1: input 7, F=3, P=0, S=3 .* = 2\.33333"):
        Window(kernel=3, stride=3).out_size(7, layer="conv1")
    assert Window(kernel=3, stride=3).out_size(7, strict=False) == 2  # PyTorch's floor


def test_output_size_not_positive_is_an_error() -> None:
    with pytest.raises(ShapeError, match="not a positive size"):
        Window(kernel=5).out_size(3)


def test_too_many_downsampling_stages_for_28px_are_refused() -> None:
    with pytest.raises(ShapeError, match=r"stage3\.conv1: input 4, F=5, P=0, S=1"):
        build_model("lenet5", MNIST, channels=[6, 16, 32])
    with pytest.raises(ShapeError, match=r"stage3\.pool: input 7, F=2, P=0, S=2 .* = 3\.5"):
        build_model("cnn", MNIST, channels=[8, 8, 8])


def test_strict_shapes_false_lets_pytorch_floor() -> None:
    net = build_model("cnn", MNIST, channels=[8, 8, 8], strict_shapes=False)
    assert net.layer_sizes[-1] == ("stage3.pool", 3)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_layer_sizes_follow_the_formula() -> None:
    net = build_model("lenet5", CIFAR)
    assert net.layer_sizes == [
        ("stage1.conv1", 28),
        ("stage1.pool", 14),
        ("stage2.conv1", 10),
        ("stage2.pool", 5),
    ]


# -- pooling numerics ----------------------------------------------------------------------

SQUARE = torch.tensor([[2.0, 5, 6, 1], [9, 3, 7, 3], [8, 5, 7, 8], [6, 6, 1, 1]]).view(1, 1, 4, 4)
MAX = torch.tensor([[9.0, 7], [8, 8]])
AVG = torch.tensor([[4.75, 4.25], [6.25, 4.25]])


def pool(name: str, x: torch.Tensor = SQUARE, p: float = 2.0) -> torch.Tensor:
    return make_pooling(name, 2, 2, p)(x).view(2, 2)


def test_max_and_average_pooling_on_the_worked_example() -> None:
    assert torch.equal(pool("max"), MAX)
    assert torch.allclose(pool("avg"), AVG)


def test_lp_pooling_p1_is_the_average_and_large_p_approaches_the_max() -> None:
    assert torch.allclose(pool("lp", p=1), AVG, atol=1e-5)
    assert torch.allclose(pool("lp", p=400), MAX, rtol=5e-3)
    two = torch.tensor(
        [
            [(4 + 25 + 81 + 9) / 4, (36 + 1 + 49 + 9) / 4],
            [(64 + 25 + 36 + 36) / 4, (49 + 64 + 1 + 1) / 4],
        ]
    ).sqrt()
    assert torch.allclose(pool("lp", p=2), two, atol=1e-5)


def test_lp_pooling_is_defined_on_magnitudes_for_negative_windows() -> None:
    assert torch.allclose(pool("lp", -SQUARE, p=3), pool("lp", SQUARE, p=3))


def test_gem_at_its_limits() -> None:
    gem = GeMPool(2, 2)
    with torch.no_grad():
        gem.raw_p.fill_(-30.0)  # p = 1 + softplus(-30) = 1 + 1e-13
    assert gem.p.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(gem(SQUARE).view(2, 2), AVG, atol=1e-4)
    assert torch.allclose(GeMPool(2, 2, p=300.0)(SQUARE).view(2, 2), MAX, rtol=1e-2)
    assert GeMPool(2, 2).p.item() == pytest.approx(3.0)  # the paper's starting power


def test_mixed_at_its_limits() -> None:
    mixed = MixedPool(2, 2)
    assert torch.allclose(mixed(SQUARE).view(2, 2), (MAX + AVG) / 2)  # starts at 0.5
    with torch.no_grad():
        mixed.logit.fill_(30.0)
    assert torch.allclose(mixed(SQUARE).view(2, 2), MAX)
    with torch.no_grad():
        mixed.logit.fill_(-30.0)
    assert torch.allclose(mixed(SQUARE).view(2, 2), AVG)


def test_learnable_poolings_have_gradients_for_their_parameters() -> None:
    for layer in (GeMPool(2, 2), MixedPool(2, 2)):
        layer(SQUARE).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad) for p in layer.parameters())


WINDOWS = {
    "zeros": torch.zeros(2, 3, 8, 8),
    "negative": -torch.rand(2, 3, 8, 8) * 50,
    "mixed sign": torch.randn(2, 3, 8, 8) * 100,
}


@pytest.mark.parametrize("name", [name for name, factory in POOLINGS.items() if factory])
@pytest.mark.parametrize("p", [1.0, 1.5, 3.0, 7.0, 200.0])
@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_every_pooling_is_finite_forward_and_backward(name: str, p: float, window: str) -> None:
    x = WINDOWS[window].clone().requires_grad_()
    y = make_pooling(name, 2, 2, p)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_pytorch_lppool_is_nan_on_negative_windows_which_is_why_cnnlab_has_its_own() -> None:
    assert torch.isnan(nn.LPPool2d(3, 2)(-SQUARE)).any()
    assert torch.isfinite(pool("lp", -SQUARE, p=3)).all()


# -- presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "overrides", "expected"),
    [
        ("lenet5", CIFAR, {}, 62_050),  # the classic summary, with batchnorm after each conv
        ("lenet5", CIFAR, {"batchnorm": False}, 62_006),
        ("lenet5", MNIST, {}, 44_470),  # 28 px: 16x4x4 features into the first FC layer
        ("alexnet_small", MNIST, {}, 8_807_370),
        ("alexnet_small", CIFAR, {}, 10_774_602),
        # airbench94: whitening 3*4*24 + 24, stages 24-64-256-256 of two bias-free 3x3
        # convs and two batchnorms (scale and shift counted, the scale frozen), 256 x 10
        ("speedrun", CIFAR, {}, 312 + 50_944 + 738_304 + 1_180_672 + 2_560),
        ("cnn", MNIST, {}, 66_026),
        ("cnn", CIFAR, {}, 66_602),
    ],
)
def test_preset_parameter_counts(
    name: str, data: InputSpec, overrides: dict, expected: int
) -> None:
    assert n_params(build_model(name, data, **overrides)) == expected


def test_summary_reports_the_table_totals_and_flops() -> None:
    net = build_model("lenet5", CIFAR, batchnorm=False)
    report = describe(net, CIFAR)
    assert report.params_total == report.params_trainable == 62_006
    conv_flops = 2 * (28 * 28 * 6 * 3 * 25 + 10 * 10 * 16 * 6 * 25)
    fc_flops = 2 * (400 * 120 + 120 * 84 + 84 * 10)
    assert report.flops == conv_flops + fc_flops
    assert "[1, 6, 28, 28]" in report.table and "62,006" in report.table


def test_alexnet_small_needs_five_conv_widths() -> None:
    with pytest.raises(ConfigError, match=r"model.channels=\[64, 128\] for alexnet_small"):
        build_model("alexnet_small", MNIST, channels=[64, 128])


# -- every knob ------------------------------------------------------------------------------

GRID = list(
    itertools.product(
        sorted(PRESETS), sorted(POOLINGS), sorted(HEADS), [False, True], [0.0, 0.3], [MNIST, CIFAR]
    )
)
# The grid checks structure, not width: narrow layers keep 504 builds quick (alexnet_small
# without pooling would otherwise start its FC stack from 256*28*28 features).
NARROW = {
    "lenet5": {},
    "cnn": {"channels": [8, 16]},
    "alexnet_small": {"channels": [8, 8, 16, 8, 8], "fc_hidden": [32, 16]},
    # whitening and three poolings: 32 -> 31 -> 3 px on CIFAR, 28 -> 27 -> 3 on MNIST
    "speedrun": {"channels": [8, 16, 16]},
}


@pytest.mark.parametrize(("backbone", "pooling", "head", "batchnorm", "dropout", "data"), GRID)
def test_every_backbone_pooling_head_norm_and_dropout_trains(
    backbone, pooling, head, batchnorm, dropout, data
) -> None:
    torch.manual_seed(0)
    # stride convs with odd kernels on even sizes are floored: allow it for this grid
    net = build_model(
        backbone,
        data,
        pooling=pooling,
        head=head,
        batchnorm=batchnorm,
        dropout=dropout,
        dropout2d=dropout,
        # speedrun's whitening leaves 31 px (27 on MNIST), which its poolings floor
        strict_shapes=pooling != "stride" and backbone != "speedrun",
        **NARROW[backbone],
    )
    assert_trains(net, data)


def assert_trains(net: nn.Module, data: InputSpec) -> None:
    logits = net(torch.randn(4, data.channels, data.size, data.size))
    assert logits.shape == (4, data.classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for name, param in net.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:  # frozen (speedrun's whitening filters, its batchnorm scales): never trained
            assert param.grad is None, name


@pytest.mark.parametrize(
    "knobs",
    [
        {"conv": "depthwise_separable"},
        {"conv": "grouped", "groups": 4},
        {"residual": True},
        {"residual": True, "conv": "depthwise_separable", "channels": [16, 16]},
        {"residual": True, "pooling": "stride", "pooling_kernel": 2, "kernel_size": 3},
        {"activation": "gelu", "pooling": "lp", "pooling_p": 3.0},
        {"stride": 2, "padding": 1, "kernel_size": 4, "pooling": "none", "channels": [16]},
        *({"activation": name} for name in sorted(ACTIVATIONS)),
    ],
)
@pytest.mark.parametrize("data", [MNIST, CIFAR], ids=["mnist", "cifar"])
def test_convolution_knobs_train(knobs: dict, data: InputSpec) -> None:
    torch.manual_seed(0)
    options = {"strict_shapes": knobs.get("pooling") != "stride"} | knobs
    assert_trains(build_model("cnn", data, **options), data)


def test_conv_kinds_change_the_model_as_named() -> None:
    standard = build_model("cnn", CIFAR, channels=[32, 64])
    separable = build_model("cnn", CIFAR, channels=[32, 64], conv="depthwise_separable")
    grouped = build_model("cnn", CIFAR, channels=[32, 64], conv="grouped", groups=4)
    assert n_params(separable) < n_params(grouped) < n_params(standard)
    stem = separable.backbone.stage1.body.conv1
    assert isinstance(stem, nn.Conv2d) and stem.groups == 1  # the stem stays standard
    assert separable.backbone.stage1.body.conv2[0].groups == 32
    assert grouped.backbone.stage2.body.conv1.groups == 4


def test_stride_pooling_moves_downsampling_into_the_last_conv() -> None:
    net = build_model("cnn", CIFAR, pooling="stride", kernel_size=4, padding=1, convs_per_stage=1)
    assert net.layer_sizes == [("stage1.conv1", 16), ("stage2.conv1", 8)]
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    with pytest.raises(ShapeError, match=r"stage1\.conv1: input 28, F=5, P=0, S=2"):
        build_model("lenet5", MNIST, pooling="stride")


def test_residual_adds_a_projection_only_where_the_shape_changes() -> None:
    net = build_model("cnn", CIFAR, channels=[16, 16, 32], residual=True)
    assert isinstance(net.backbone.stage2.shortcut, nn.Identity)
    assert isinstance(net.backbone.stage1.shortcut[0], nn.Conv2d)  # 3 -> 16 channels
    assert net.backbone.stage3.shortcut[0].out_channels == 32
    with pytest.raises(ConfigError, match="stage1 maps 28 px to 24 px"):
        build_model("lenet5", MNIST, residual=True)


def test_heads_are_what_they_say() -> None:
    nin = build_model("cnn", MNIST, head="nin")
    assert not any(isinstance(m, nn.Linear) for m in nin.modules())  # no dense layer at all
    gap = build_model("cnn", MNIST, head="gap")
    assert [m.in_features for m in gap.modules() if isinstance(m, nn.Linear)] == [64]
    fc = build_model("cnn", MNIST, head="fc", fc_hidden=[100, 50])
    assert [m.in_features for m in fc.modules() if isinstance(m, nn.Linear)] == [
        64 * 7 * 7,
        100,
        50,
    ]


def test_dropout_knobs_add_layers_only_when_on() -> None:
    plain = build_model("cnn", MNIST)
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in plain.modules())
    both = build_model("cnn", MNIST, dropout=0.5, dropout2d=0.1)
    assert sum(isinstance(m, nn.Dropout2d) for m in both.modules()) == 2  # one per stage
    assert sum(type(m) is nn.Dropout for m in both.modules()) == 1


# -- bad knobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knob", "value", "table"),
    [
        ("pooling", "maxx", POOLINGS),
        ("activation", "relu6x", ACTIVATIONS),
        ("head", "mlp", HEADS),
        ("conv", "dilated", CONVS),
    ],
)
def test_unknown_names_list_the_valid_ones(knob: str, value: str, table: dict) -> None:
    valid = ", ".join(sorted(table))
    with pytest.raises(ValueError, match=f"unknown {knob} '{value}'; valid: {valid}$"):
        build_model("cnn", MNIST, **{knob: value})


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown backbone 'resnet'; valid: alexnet_small, cnn, lenet5, speedrun$"
    ):
        build_model("resnet", MNIST)


def test_groups_that_do_not_divide_the_channels_say_why() -> None:
    with pytest.raises(ValueError, match=r"model.groups=3 to divide .* 32 -> 32 does not"):
        build_model("cnn", MNIST, conv="grouped", groups=3)


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"pooling_p": 0.5}, r"model.pooling_p=0.5 is out of range; valid: \[1, inf\)"),
        ({"dropout": 1.0}, r"model.dropout=1.0 is out of range; valid: \[0, 1\)"),
        ({"dropout2d": -0.1}, r"model.dropout2d=-0.1 is out of range; valid: \[0, 1\)"),
        ({"channels": []}, r"model.channels=\[\] is empty"),
        ({"kernel_size": 0}, r"model.kernel_size=0 is out of range; valid: \[1, inf\)"),
    ],
)
def test_out_of_range_knobs_are_refused(knobs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**knobs)
