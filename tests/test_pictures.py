"""Per-run pictures: drawn from the model and data they claim to show."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cnnlab import pictures
from cnnlab.models import InputSpec, build_model
from cnnlab.training.classifier import Classifier


def test_the_confusion_matrix_counts_every_test_image_once() -> None:
    torch.manual_seed(0)
    net = build_model("lenet5", InputSpec(1, 28, 10))
    module = Classifier(net, 10, lambda params: torch.optim.SGD(params, lr=0.1))
    images, labels = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (result,) = trainer.test(module, DataLoader(TensorDataset(images, labels), batch_size=32))
    matrix = module.test_confusion_matrix
    assert matrix.shape == (10, 10) and int(matrix.sum()) == 100
    assert matrix.sum(1).tolist() == torch.bincount(labels, minlength=10).tolist()  # rows: true
    assert float(matrix.trace()) / 100 == pytest.approx(result["test/acc"])


def test_feature_maps_are_the_stage_outputs_of_the_net() -> None:
    net = build_model("lenet5", InputSpec(1, 28, 10)).eval()
    images = torch.randn(3, 1, 28, 28)
    outputs = pictures.stage_outputs(net, images)
    assert [tuple(maps.shape) for _, maps in outputs] == [(3, 6, 12, 12), (3, 16, 4, 4)]
    assert torch.allclose(outputs[-1][1], net.forward_features(images))
    figure = pictures.feature_maps(net, images)
    assert len(figure.axes) == 3 * 2 * 9  # (image, stage) rows x (input + 8 channels)


def test_every_picture_of_a_run_is_drawn() -> None:
    net = build_model("lenet5", InputSpec(1, 28, 10)).eval()
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    history = {"train/loss": [(0, 2.3), (1, 2.0)], "val/acc": [(1, 0.3)]}
    confusion = torch.eye(10, dtype=torch.long)
    classes = [str(label) for label in range(10)]
    normalized = images.float() / 255
    figures = pictures.for_run(net, images, normalized, labels, classes, history, confusion)
    assert set(figures) == {
        "learning_curves.png",
        "first_layer_filters.png",
        "feature_maps.png",
        "misclassified.png",
        "confusion_matrix.png",
    }
    predicted = net(normalized).argmax(1)
    wrong = int((predicted != labels).sum())
    title = figures["misclassified.png"].get_suptitle()
    assert title.startswith(f"misclassified: {wrong} of 40 test images")
    shown = [axes for axes in figures["misclassified.png"].axes if axes.images]
    assert len(shown) == min(wrong, 24)
    filters = [axes for axes in figures["first_layer_filters.png"].axes if axes.images]
    assert len(filters) == 6  # LeNet-5's first convolution has 6 kernels
    for figure in figures.values():
        figure.savefig(io.BytesIO(), format="png")  # renders without pyplot
