"""Print a model's per-layer table, sizes, parameters and FLOPs without any dataset file:
``python -m cnnlab.summary model=cnn data=mnist model.pooling=lp``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cnnlab import compose, config
from cnnlab.cli import user_errors
from cnnlab.data import dataset_info
from cnnlab.models import InputSpec, build_model
from cnnlab.models.summary import describe

compose.register_configs()


def summarize(cfg: DictConfig) -> str:
    settings = config.to_settings(cfg)
    info = dataset_info(settings.data.name)
    data = InputSpec(info.channels, info.size, info.classes)
    net = build_model(settings.model, data)
    report = describe(net, data)
    sizes = "  ".join(f"{layer} {size}px" for layer, size in net.layer_sizes)
    return "\n".join(
        [
            f"{settings.model.name} on {info.name} ({info.channels}x{info.size}x{info.size}, "
            f"{info.classes} classes)",
            report.table,  # its mult-add and FLOPs lines are cnnlab's, per image
            f"output sizes: {sizes}",
            f"parameters: {report.params_total:,} total, {report.params_trainable:,} trainable",
        ]
    )


@hydra.main(version_base="1.3", config_path=str(config.CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors():
        print(summarize(cfg))


if __name__ == "__main__":
    main()
