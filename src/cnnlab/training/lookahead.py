"""airbench's lookahead: every few steps the weights are pulled back toward a running
average of themselves, harder as training ends, and the last weights are that average."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor


class Lookahead(L.Callback):
    """Every ``every`` optimizer steps, the average moves toward the net's floating-point
    weights and buffers by ``1 - rate`` and the net is set to the average, where
    ``rate = decay**every * (step / total_steps)**power`` (airbench: every 5 steps, decay
    0.95, power 3: no pull at first, 0.77 at the end). After the run's last step the net is
    the average. The average is saved in checkpoints, so a resumed run goes on with it."""

    def __init__(self, every: int = 5, decay: float = 0.95, power: float = 3.0) -> None:
        if every < 1 or not 0 <= decay <= 1 or power < 0:
            raise ValueError(
                f"lookahead every={every}, decay={decay}, power={power}; valid: every >= 1, "
                "decay in [0, 1], power >= 0"
            )
        self.every, self.decay, self.power = every, decay, power
        self.average: dict[str, Tensor] | None = None
        self.weights: dict[str, Tensor] = {}  # the net's, found once by track(), not each pull
        self.total_steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        self.track(pl_module.net)

    def track(self, net: torch.nn.Module) -> None:
        """Pull ``net``'s floating-point weights and buffers from now on; their average starts
        as they are, unless one was restored from a checkpoint (then it moves to their device)."""
        self.weights = _floating(net)
        if self.average is None:
            self.average = {name: value.detach().clone() for name, value in self.weights.items()}
        else:  # restored from a checkpoint, on the CPU
            self.average = {
                name: self.average[name].to(self.weights[name]) for name in self.weights
            }

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            self.pull(self.rate(step))
        if step >= self.total_steps:
            self.pull(1.0)

    def rate(self, step: int) -> float:
        """The share of the average kept at ``step`` (airbench's alpha schedule)."""
        return (
            self.decay**self.every * (min(step, self.total_steps) / self.total_steps) ** self.power
        )

    @torch.no_grad()
    def pull(self, rate: float) -> None:
        """average = rate * average + (1 - rate) * weights; weights = average."""
        for name, value in self.weights.items():
            average = self.average[name]
            average.lerp_(value, 1 - rate)
            value.copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average or {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = dict(state_dict["average"]) or None


def _floating(net: torch.nn.Module) -> dict[str, Tensor]:
    """The net's floating-point parameters and buffers (batchnorm statistics too; not its
    step counters), by name."""
    return {
        name: value
        for name, value in net.state_dict(keep_vars=True).items()
        if value.is_floating_point()
    }
