"""Pictures of one trained model, logged as artifacts of its run (``pictures/``): the test
confusion matrix, learning curves, first-layer filters, feature maps after each stage, and
misclassified test images. Plain torch and matplotlib: usable from a notebook too.

Each figure's title names the run and counts what the figure shows (which test images, how
many, which weights), so a picture read on its own says what it is.
"""

from __future__ import annotations

import math
import textwrap

import torch
from matplotlib.figure import Figure  # not pyplot's figures: no global state to close
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from cnnlab.models import Net

TITLE_PT = 10  # font size of a figure's title
CHAR_WIDTH = 0.6  # of a title character, in em: how many fit the figure's width


def titled(figure: Figure, run_name: str, what: str, detail: str = "") -> Figure:
    """``figure`` with the title "<run_name>: <what>" over ``detail``, each wrapped to the
    figure's width (layout="tight" makes room for it, but does not shrink it)."""
    width = int(figure.get_figwidth() * 72 / (TITLE_PT * CHAR_WIDTH))  # characters a line
    lines = [f"{run_name}: {what}" if run_name else what, detail]
    text = "\n".join(textwrap.fill(line, width) for line in lines if line)
    figure.suptitle(text, fontsize=TITLE_PT)
    return figure


def _which(weights: str) -> str:
    return f" ({weights})" if weights else ""


def confusion_matrix(
    matrix: Tensor,
    classes: list[str],
    *,
    run_name: str = "",
    test_size: int | None = None,
    weights: str = "",
) -> Figure:
    """``matrix[true, predicted]`` counts, drawn by torchmetrics; ``test_size``: the images
    in the test set, which the title compares with the predictions counted."""
    figure = Figure(figsize=(1.2 + 0.55 * len(classes), 1.4 + 0.5 * len(classes)), layout="tight")
    axes = figure.subplots()
    metric = MulticlassConfusionMatrix(len(classes))
    metric.plot(matrix.cpu(), ax=axes, labels=[name.split(" - ")[0] for name in classes])
    counted = int(matrix.sum())
    if test_size is None or counted == test_size:
        what = f"confusion matrix, test set, {counted:,} images{_which(weights)}"
    else:  # trainer.limit_test_batches, or DDP's padding of the last batch
        what = f"confusion matrix, {counted:,} predictions of {test_size:,} test images"
        what += _which(weights)
    return titled(figure, run_name, what, "rows: true class, columns: predicted class")


def learning_curves(history: dict[str, list[tuple[int, float]]], *, run_name: str = "") -> Figure:
    """Loss and accuracy against the training step, train and validation; ``history`` maps
    a metric name (``train/loss``, ``val/acc``, ...) to its (step, value) points."""
    figure = Figure(figsize=(10, 4.3), layout="tight")
    for axes, kind in zip(figure.subplots(1, 2), ("loss", "acc"), strict=True):
        for stage in ("train", "val"):
            points = sorted(history.get(f"{stage}/{kind}", []))
            if points:
                steps, values = zip(*points, strict=True)
                axes.plot(steps, values, marker="." if stage == "val" else "", label=stage)
        axes.set_xlabel("step")
        axes.set_ylabel(kind)
        axes.grid(alpha=0.3)
        axes.legend()
    points = {stage: len(history.get(f"{stage}/loss", [])) for stage in ("train", "val")}
    steps = [step for series in history.values() for step, _ in series]
    detail = f"logged points: {points['train']} train, {points['val']} validation"
    detail += f", to step {max(steps):,}" if steps else ""
    return titled(figure, run_name, "learning curves (x: training step)", detail)


def first_layer_filters(net: nn.Module, *, run_name: str = "", weights: str = "") -> Figure:
    """The kernels of the first convolution: RGB when it reads 3 channels, else grey."""
    conv = next(module for module in net.modules() if isinstance(module, nn.Conv2d))
    weight = conv.weight.detach().cpu()  # (out, in/groups, F, F)
    count, inputs, height, width = weight.shape
    columns = min(count, 8)
    figure = Figure(figsize=(columns * 1.1, math.ceil(count / columns) * 1.1 + 0.7), layout="tight")
    shown = "in RGB" if inputs == 3 else "grey" if inputs == 1 else f"grey: mean of {inputs}"
    titled(
        figure,
        run_name,
        f"{count} first-layer filters{_which(weights)}",
        f"{inputs}x{height}x{width} each, {shown}",
    )
    for index, axes in enumerate(
        figure.subplots(math.ceil(count / columns), columns, squeeze=False).flat
    ):
        axes.axis("off")
        if index < count:
            kernel = _unit_range(weight[index])
            if kernel.shape[0] == 3:
                axes.imshow(kernel.permute(1, 2, 0).numpy())
            else:
                axes.imshow(kernel.mean(0).numpy(), cmap="gray")
    return figure


@torch.no_grad()
def stage_outputs(net: Net, images: Tensor) -> list[tuple[str, Tensor]]:
    """The feature maps after each stage of ``net``'s backbone, for normalized ``images``."""
    outputs, x = [], images
    for name, stage in net.backbone.named_children():
        x = stage(x)
        outputs.append((name, x))
    return outputs


def feature_maps(
    net: Net, images: Tensor, channels: int = 8, *, run_name: str = "", weights: str = ""
) -> Figure:
    """For each image (a row block) and stage (a row): its first ``channels`` feature maps."""
    stages = stage_outputs(net, images)
    rows = [(i, name, maps[i]) for i in range(len(images)) for name, maps in stages]
    figure = Figure(figsize=((channels + 1) * 1.1, len(rows) * 1.15 + 0.5), layout="tight")
    counts = [f"{name} {min(channels, maps.shape[1])} of {maps.shape[1]}" for name, maps in stages]
    titled(
        figure,
        run_name,
        f"feature maps of the first {len(images)} test images after each stage{_which(weights)}",
        "channels shown: " + ", ".join(counts),
    )
    grid = figure.subplots(len(rows), channels + 1, squeeze=False)
    for (image_index, name, maps), axes_row in zip(rows, grid, strict=True):
        axes_row[0].imshow(_unit_range(images[image_index]).mean(0).cpu().numpy(), cmap="gray")
        axes_row[0].set_title(f"image {image_index}: {name}", fontsize="x-small", loc="left")
        for channel, axes in enumerate(axes_row[1:]):
            if channel < maps.shape[0]:
                axes.imshow(maps[channel].cpu().numpy(), cmap="viridis")
        for axes in axes_row:
            axes.axis("off")
    return figure


def misclassified(
    images: Tensor,
    labels: Tensor,
    predicted: Tensor,
    classes: list[str],
    limit: int = 24,
    *,
    run_name: str = "",
    test_size: int | None = None,
    weights: str = "",
) -> Figure:
    """Test images the model got wrong (uint8, (N, C, H, W)), titled predicted / true;
    ``images`` are the first of the ``test_size`` in the test set (default: all of them)."""
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    figure = Figure(figsize=(columns * 1.2, rows * 1.4 + 0.7), layout="tight")
    count = int((predicted != labels).sum())
    scope = "the first " if test_size is not None and len(labels) < test_size else ""
    what = f"{count:,} of {scope}{len(labels):,} test images misclassified"
    what += f"; showing {len(wrong)}" if len(wrong) < count else ""
    titled(figure, run_name, what + _which(weights), "each: predicted / true class")
    for slot, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if slot < len(wrong):
            index = wrong[slot]
            image = images[index].permute(1, 2, 0).squeeze(-1).cpu().numpy()
            axes.imshow(image, cmap="gray" if image.ndim == 2 else None)
            name = classes[predicted[index]].split(" - ")[0]
            axes.set_title(f"{name} / {classes[labels[index]].split(' - ')[0]}", fontsize="small")
    return figure


def _unit_range(tensor: Tensor) -> Tensor:
    tensor = tensor.detach().float()
    low, high = tensor.min(), tensor.max()
    return (tensor - low) / (high - low) if high > low else torch.zeros_like(tensor)


@torch.no_grad()
def for_run(
    net: Net,
    images: Tensor,
    normalized: Tensor,
    labels: Tensor,
    classes: list[str],
    history: dict[str, list[tuple[int, float]]],
    confusion: Tensor | None,
    *,
    run_name: str = "",
    test_size: int | None = None,
    weights: str = "",
) -> dict[str, Figure]:
    """Every picture of a run, by file name, titled with ``run_name``. ``images`` (uint8)
    and ``normalized`` are the same test images, as stored and as the model reads them: the
    first of the ``test_size`` in the test set (default: all). ``weights`` says which the
    net holds (e.g. "best checkpoint")."""
    net.eval()
    predicted = net(normalized).argmax(1)
    test = {"test_size": test_size, "run_name": run_name, "weights": weights}
    figures = {
        "learning_curves.png": learning_curves(history, run_name=run_name),
        "first_layer_filters.png": first_layer_filters(net, run_name=run_name, weights=weights),
        "feature_maps.png": feature_maps(net, normalized[:3], run_name=run_name, weights=weights),
        "misclassified.png": misclassified(images, labels, predicted, classes, **test),
    }
    if confusion is not None:
        figures["confusion_matrix.png"] = confusion_matrix(confusion, classes, **test)
    return figures
