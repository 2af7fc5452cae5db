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


def test_every_picture_of_a_run_is_drawn_and_titled_with_the_run() -> None:
    net = build_model("lenet5", InputSpec(1, 28, 10)).eval()
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    history = {"train/loss": [(0, 2.3), (1, 2.0)], "val/acc": [(1, 0.3)]}
    confusion = torch.eye(10, dtype=torch.long) * 30  # 300 test images, all right
    classes = [str(label) for label in range(10)]
    normalized = images.float() / 255
    figures = pictures.for_run(
        net, images, normalized, labels, classes, history, confusion,
        run_name="lenet5-bn-max-fc-s0", test_size=300, weights="best checkpoint",
    )  # fmt: skip
    assert set(figures) == {
        "learning_curves.png",
        "first_layer_filters.png",
        "feature_maps.png",
        "misclassified.png",
        "confusion_matrix.png",
    }
    titles = {name: figure.get_suptitle() for name, figure in figures.items()}
    assert all(title.startswith("lenet5-bn-max-fc-s0: ") for title in titles.values())
    predicted = net(normalized).argmax(1)
    wrong = int((predicted != labels).sum())
    shown = [axes for axes in figures["misclassified.png"].axes if axes.images]
    assert len(shown) == min(wrong, 24)
    expected = f"{wrong} of the first 40 test images misclassified" + (
        f"; showing {len(shown)}" if len(shown) < wrong else ""
    )
    assert expected in " ".join(titles["misclassified.png"].split())
    assert "300 images (best checkpoint)" in titles["confusion_matrix.png"]
    assert "6 first-layer filters (best checkpoint)" in titles["first_layer_filters.png"]
    assert "stage1 6 of 6, stage2 8 of 16" in " ".join(titles["feature_maps.png"].split())
    assert "2 train, 0 validation, to step 1" in " ".join(titles["learning_curves.png"].split())
    filters = [axes for axes in figures["first_layer_filters.png"].axes if axes.images]
    assert len(filters) == 6  # LeNet-5's first convolution has 6 kernels
    for figure in figures.values():
        figure.savefig(io.BytesIO(), format="png")  # renders without pyplot


@pytest.mark.parametrize(
    ("counted", "test_size", "says"),
    [
        (10_000, 10_000, "confusion matrix, test set, 10,000 images (final weights)"),
        (2_048, 10_000, "confusion matrix, 2,048 predictions of 10,000 test images"),
    ],
)
def test_the_confusion_matrix_says_how_many_test_images_it_counts(
    counted: int, test_size: int, says: str
) -> None:
    matrix = torch.zeros(10, 10, dtype=torch.long)
    matrix[0, 0] = counted  # one class, all right: the count is what the title reads
    classes = [str(label) for label in range(10)]
    figure = pictures.confusion_matrix(
        matrix, classes, run_name="cnn-s3", test_size=test_size, weights="final weights"
    )
    title = " ".join(figure.get_suptitle().split())
    assert title.startswith("cnn-s3: ") and says in title
    assert "rows: true class, columns: predicted class" in title


def test_misclassified_says_which_test_images_it_counts() -> None:
    labels = torch.zeros(50, dtype=torch.long)
    predicted = torch.zeros(50, dtype=torch.long)
    predicted[:30] = 1  # 30 wrong, 24 shown
    images = torch.zeros(50, 1, 8, 8, dtype=torch.uint8)
    classes = ["zero", "one"]
    whole = pictures.misclassified(images, labels, predicted, classes, test_size=50)
    assert whole.get_suptitle().startswith("30 of 50 test images misclassified; showing 24")
    first = pictures.misclassified(images, labels, predicted, classes, run_name="r", test_size=900)
    assert "r: 30 of the first 50 test images misclassified; showing 24" in " ".join(
        first.get_suptitle().split()
    )
