"""Run by tests/test_ddp.py under Lightning's DDP launcher: records which images each rank
sees, per epoch and split, and writes them from rank 0 as JSON (path in argv[2])."""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch import nn

from cnnlab.data import ImageDataModule
from cnnlab.data.config import DataConfig

MEAN, STD = 0.1307, 0.3081  # MNIST normalization, undone to read the index back


def image_ids(images: torch.Tensor) -> torch.Tensor:
    """The fixture writes each image's index into its first two pixels (low, high byte)."""
    pixels = torch.round((images[:, 0, 0, :2] * STD + MEAN) * 255).long()
    return pixels[:, 0] + 256 * pixels[:, 1]


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: dict[str, list[int]] = {}

    def _record(self, key: str, images: torch.Tensor) -> None:
        self.seen.setdefault(key, []).extend(image_ids(images).tolist())

    def training_step(self, batch, batch_idx):
        self._record(f"train/{self.current_epoch}", batch[0])
        return self.layer(batch[0][:, :1, 0, 0]).sum()

    def validation_step(self, batch, batch_idx):
        self._record(f"val/{self.current_epoch}", batch[0])

    def on_train_end(self) -> None:
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, self.seen)
        if self.global_rank == 0:
            with open(sys.argv[2], "w") as f:
                json.dump(gathered, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    datamodule = ImageDataModule(
        DataConfig(
            root=sys.argv[1],
            source="torchvision",
            download=False,
            batch_size=16,
            eval_batch_size=16,
            val_size=60,
        )
    )
    trainer = L.Trainer(
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        max_epochs=2,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Recorder(), datamodule=datamodule)
