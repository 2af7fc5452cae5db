"""airbench's optimizer and schedule, as factories Hydra completes (``_partial_: true``).

``grouped_sgd`` is configured with ``optimizer._target_=cnnlab.training.optim.grouped_sgd``;
it takes the net (not a list of parameters) to find its batchnorm shifts, so the
:class:`~cnnlab.training.classifier.Classifier` hands it ``net=`` instead of ``params=``.
``PiecewiseLinear`` is a scheduler factory that takes ``total_steps``, so it is stepped
every batch, as one-cycle is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def grouped_sgd(
    net: nn.Module,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    norm_bias_lr_scale: float = 1.0,
) -> torch.optim.SGD:
    """SGD over the trainable parameters of ``net`` in two groups: batchnorm shifts at
    ``lr * norm_bias_lr_scale`` (airbench: 64x), everything else at ``lr``.

    ``decoupled_weight_decay``: ``weight_decay`` is the fraction of each weight removed per
    step at the schedule's peak, whatever the group's learning rate (torch's SGD multiplies
    its decay by the learning rate, so each group gets ``weight_decay / its lr``: the trick
    airbench uses). Otherwise it is torch's coupled L2 term.
    """
    norm_biases = {
        id(module.bias)
        for module in net.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None
    }
    trainable = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in norm_biases], "lr": lr * norm_bias_lr_scale},
        {"params": [p for p in trainable if id(p) not in norm_biases], "lr": lr},
    ]
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["weight_decay"] = (
            weight_decay / group["lr"] if decoupled_weight_decay else weight_decay
        )
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


class PiecewiseLinear:
    """The learning rate's multiplier at a step, linear between ``knots``: (fraction of the
    run, multiplier) pairs, as airbench's ``np.interp`` over [0, 0.23, 1] x [0.2, 1, 0.07].
    A class, not a lambda, so that a checkpoint keeps it as plain data."""

    def __init__(self, total_steps: int, knots: list[list[float]]) -> None:
        self.total_steps = total_steps
        self.steps = [int(fraction * total_steps) for fraction, _ in knots]
        self.values = [float(value) for _, value in knots]

    def __call__(self, step: int) -> float:
        return float(np.interp(step, self.steps, self.values))


def piecewise_linear(
    optimizer: torch.optim.Optimizer, *, total_steps: int, knots: list[list[float]]
) -> LambdaLR:
    """Each group's learning rate times :class:`PiecewiseLinear` of the step.

    Raises:
        ValueError: knots not starting at 0, ending at 1 or increasing, or a negative value.
    """
    fractions = [knot[0] for knot in knots]
    if len(knots) < 2 or fractions[0] != 0 or fractions[-1] != 1 or fractions != sorted(fractions):
        raise ValueError(
            f"scheduler.knots={knots}: valid: [fraction of the run, lr multiplier] pairs "
            "from fraction 0 to fraction 1, increasing"
        )
    if any(knot[1] < 0 for knot in knots):
        raise ValueError(f"scheduler.knots={knots}: a learning-rate multiplier is negative")
    schedule = LambdaLR(optimizer, PiecewiseLinear(total_steps, knots))
    schedule.total_steps = total_steps  # what Classifier.on_train_start compares on resume
    return schedule
