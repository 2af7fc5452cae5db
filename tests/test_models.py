"""Models: output-size arithmetic, layer numerics, presets' parameter counts, every knob
combination trains (forward and backward), and bad names are refused with the valid ones."""

from __future__ import annotations

import itertools

import pytest
import torch

from cnnlab.models import BACKBONES, InputSpec, ShapeError, Window, build_model
from cnnlab.models.heads import HEADS
from cnnlab.models.layers import ACTIVATIONS, POOLINGS, make_pooling

MNIST = InputSpec(channels=1, size=28, classes=10)
CIFAR = InputSpec(channels=3, size=32, classes=10)
LENET = dict(channels=[6, 16], kernel_size=5, fc_hidden=[120, 84])


@pytest.mark.parametrize(("stride", "expected"), [(1, 5), (2, 3)])
def test_output_size_formula(stride: int, expected: int) -> None:
    assert Window(kernel=3, stride=stride).out_size(7) == expected


def test_output_size_not_exact_is_an_error_naming_the_layer() -> None:
    with pytest.raises(ShapeError, match=r"conv1: input 7, F=3, P=0, S=3 .* = 2\.33333"):
        Window(kernel=3, stride=3).out_size(7, layer="conv1")
    assert Window(kernel=3, stride=3).out_size(7, strict=False) == 2  # PyTorch's floor


def test_output_size_not_positive_is_an_error() -> None:
    with pytest.raises(ShapeError, match="not a positive size"):
        Window(kernel=5).out_size(3)


def test_too_many_downsampling_stages_for_28px_are_refused_before_building() -> None:
    with pytest.raises(ShapeError, match=r"stage3\.conv1: input 4, F=5"):
        build_model("lenet5", MNIST, **LENET | {"channels": [6, 16, 32]})


def test_strict_shapes_false_lets_pytorch_floor() -> None:
    net = build_model("lenet5", MNIST, **LENET | {"pooling_kernel": 3, "strict_shapes": False})
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


SQUARE = torch.tensor([[2.0, 5, 6, 1], [9, 3, 7, 3], [8, 5, 7, 8], [6, 6, 1, 1]]).view(1, 1, 4, 4)


def test_max_pooling_on_the_worked_example() -> None:
    out = make_pooling("max", 2, 2)(SQUARE)
    assert torch.equal(out.view(2, 2), torch.tensor([[9.0, 7], [8, 8]]))


def test_average_pooling_on_the_worked_example() -> None:
    out = make_pooling("avg", 2, 2)(SQUARE)
    assert torch.allclose(out.view(2, 2), torch.tensor([[4.75, 4.25], [6.25, 4.25]]))


@pytest.mark.parametrize(
    ("data", "batchnorm", "expected"),
    [
        (CIFAR, True, 62_050),  # the classic LeNet-5 summary with batchnorm after each conv
        (CIFAR, False, 62_006),
        (MNIST, True, 44_470),  # 28 px: 16x4x4 features into the first FC layer
    ],
)
def test_lenet5_parameter_counts(data: InputSpec, batchnorm: bool, expected: int) -> None:
    net = build_model("lenet5", data, **LENET | {"batchnorm": batchnorm})
    assert sum(p.numel() for p in net.parameters()) == expected


def test_lenet5_layer_sizes_follow_the_formula() -> None:
    net = build_model("lenet5", CIFAR, **LENET)
    assert net.layer_sizes == [
        ("stage1.conv1", 28),
        ("stage1.pool", 14),
        ("stage2.conv1", 10),
        ("stage2.pool", 5),
    ]


GRID = list(
    itertools.product(
        sorted(BACKBONES),
        sorted(POOLINGS),
        sorted(HEADS),
        [False, True],
        [0.0, 0.3],
        [MNIST, CIFAR],
    )
)


@pytest.mark.parametrize(("backbone", "pooling", "head", "batchnorm", "dropout", "data"), GRID)
def test_every_combination_runs_forward_and_backward(
    backbone, pooling, head, batchnorm, dropout, data
) -> None:
    torch.manual_seed(0)
    net = build_model(
        backbone,
        data,
        **LENET | dict(pooling=pooling, head=head, batchnorm=batchnorm, dropout=dropout),
    )
    logits = net(torch.randn(4, data.channels, data.size, data.size))
    assert logits.shape == (4, data.classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize(
    ("knob", "value", "table"),
    [
        ("pooling", "maxx", POOLINGS),
        ("activation", "relu6x", ACTIVATIONS),
        ("head", "mlp", HEADS),
    ],
)
def test_unknown_names_list_the_valid_ones(knob: str, value: str, table: dict) -> None:
    valid = ", ".join(sorted(table))
    with pytest.raises(ValueError, match=f"unknown {knob} '{value}'; valid: {valid}$"):
        build_model("lenet5", MNIST, **LENET | {knob: value})


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet'; valid: lenet5"):
        build_model("resnet", MNIST)
