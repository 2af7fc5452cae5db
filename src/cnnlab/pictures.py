"""Pictures of one trained model, logged as artifacts of its run (``pictures/``): the test
confusion matrix, learning curves, first-layer filters, feature maps after each stage, and
misclassified test images. Plain torch and matplotlib: usable from a notebook too."""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure  # not pyplot's figures: no global state to close
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from cnnlab.models import Net


def confusion_matrix(matrix: Tensor, classes: list[str]) -> Figure:
    """``matrix[true, predicted]`` counts, drawn by torchmetrics."""
    figure = Figure(figsize=(1.2 + 0.55 * len(classes), 1 + 0.5 * len(classes)), layout="tight")
    axes = figure.subplots()
    metric = MulticlassConfusionMatrix(len(classes))
    metric.plot(matrix.cpu(), ax=axes, labels=[name.split(" - ")[0] for name in classes])
    axes.set_title("test confusion matrix (rows: true, columns: predicted)")
    return figure


def learning_curves(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Loss and accuracy against the training step, train and validation; ``history`` maps
    a metric name (``train/loss``, ``val/acc``, ...) to its (step, value) points."""
    figure = Figure(figsize=(10, 4), layout="tight")
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
    return figure


def first_layer_filters(net: nn.Module) -> Figure:
    """The kernels of the first convolution: RGB when it reads 3 channels, else grey."""
    conv = next(module for module in net.modules() if isinstance(module, nn.Conv2d))
    weight = conv.weight.detach().cpu()  # (out, in/groups, F, F)
    count = weight.shape[0]
    columns = min(count, 8)
    figure = Figure(figsize=(columns * 1.1, math.ceil(count / columns) * 1.1 + 0.4), layout="tight")
    figure.suptitle(f"first-layer filters ({tuple(weight.shape[1:])} each)")
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


def feature_maps(net: Net, images: Tensor, channels: int = 8) -> Figure:
    """For each image (a row block) and stage (a row): its first ``channels`` feature maps."""
    stages = stage_outputs(net, images)
    rows = [(i, name, maps[i]) for i in range(len(images)) for name, maps in stages]
    figure = Figure(figsize=((channels + 1) * 1.1, len(rows) * 1.15), layout="tight")
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
    images: Tensor, labels: Tensor, predicted: Tensor, classes: list[str], limit: int = 24
) -> Figure:
    """Test images the model got wrong (uint8, (N, C, H, W)), titled predicted / true."""
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    columns = 8
    rows = max(1, math.ceil(len(wrong) / columns))
    figure = Figure(figsize=(columns * 1.2, rows * 1.4 + 0.4), layout="tight")
    count = int((predicted != labels).sum())
    figure.suptitle(f"misclassified: {count} of {len(labels)} test images (predicted / true)")
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
) -> dict[str, Figure]:
    """Every picture of a run, by file name; ``images`` (uint8) and ``normalized`` are the
    same test images, as stored and as the model reads them."""
    net.eval()
    predicted = net(normalized).argmax(1)
    figures = {
        "learning_curves.png": learning_curves(history),
        "first_layer_filters.png": first_layer_filters(net),
        "feature_maps.png": feature_maps(net, normalized[:3]),
        "misclassified.png": misclassified(images, labels, predicted, classes),
    }
    if confusion is not None:
        figures["confusion_matrix.png"] = confusion_matrix(confusion, classes)
    return figures
