"""Hydra composition: the schemas registered in Hydra's ConfigStore, ``conf/train.yaml``
composed from Python (notebooks, benchmarks, tests) as ``python -m cnnlab.train`` composes it,
and the knob tables of ``--help``, read from the registries so that help cannot drift.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cnnlab.config import (
    COMPILE_MODES,
    CONF_DIR,
    CROP_FILLS,
    FLIPS,
    MATMUL_PRECISIONS,
    TrainConfig,
)
from cnnlab.models import PRESETS, preset
from cnnlab.models.heads import HEADS
from cnnlab.models.layers import ACTIVATIONS, CONVS, INITS
from cnnlab.models.pooling import POOLINGS
from cnnlab.models.tta import TTA

HYDRA_OUTPUT_DIR = "${hydra:runtime.output_dir}"  # paths.output_dir, as conf/ sets it

HELP_WIDTH = 100  # characters in a line of --help, at most
# The knobs --help lists, by section of the composed config ("": the top level), each field
# of its schema: valid values are the names of its table below (an enum: its members), else
# the field's type.
HELP_SECTIONS = ("model", "data", "perf", "sweep", "logger", "")
NAMED_VALUES: dict[str, Iterable[str]] = {
    "model.name": PRESETS,  # the presets: model=<name> sets every knob of one
    "model.pooling": POOLINGS,
    "model.head": HEADS,
    "model.activation": ACTIVATIONS,
    "model.conv": CONVS,
    "model.init": INITS,
    "data.crop_fill": CROP_FILLS,
    "data.flip": FLIPS,
    "tta": TTA,
    "perf.compile_mode": COMPILE_MODES,
    "perf.matmul_precision": MATMUL_PRECISIONS,
}
# Hydra's own groups that cnnlab adds options to (launcher=slurm, sweeper=grid and racing).
HYDRA_GROUPS = ("hydra/launcher", "hydra/sweeper")
KNOBS_LEGEND = (
    "Knobs, set as KEY=VALUE: each with its value under this command line's groups and\n"
    "overrides (`model=cnn --help` shows cnn's) and the values it may take."
)


def _sweep_batch(fail_fast: bool) -> int | None:
    """Jobs per launch batch: Hydra re-raises a job's failure only after its batch ends."""
    return 1 if fail_fast else None


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore: ``train_schema`` (listed first by
    conf/train.yaml) and one ``model`` group option per preset in cnnlab.models.PRESETS."""
    if not OmegaConf.has_resolver("cnnlab_sweep_batch"):
        OmegaConf.register_new_resolver("cnnlab_sweep_batch", _sweep_batch)
    if not OmegaConf.has_resolver("cnnlab_knobs"):  # conf/hydra/help/cnnlab.yaml
        OmegaConf.register_new_resolver("cnnlab_knobs", knobs_help)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in PRESETS:
        store.store(group="model", name=name, node=preset(name))


def recompose(config_name: str, overrides: list[str]) -> DictConfig:
    """``config_name`` composed again with ``overrides`` (no ``hydra`` node), inside a Hydra
    app or outside one (a config built by :func:`compose`, whose Hydra has closed)."""
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name, overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def compose(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` composed as ``python -m cnnlab.train`` would,
    writing into ``output_dir``, for Python (notebooks, benchmarks, tests). The result needs
    no Hydra runtime: ``paths.output_dir`` is set to ``output_dir``, so
    ``training.prepare(config.to_settings(cfg))`` works as it is. Hydra's runtime is set as
    well, for the entry point :func:`cnnlab.train.run`, which reads it."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.name = "train"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if cfg.paths._get_node("output_dir")._value() == HYDRA_OUTPUT_DIR:  # not overridden
            cfg.paths.output_dir = str(output_dir)
    return cfg


def knobs_help(*, _root_: DictConfig) -> str:
    """``${cnnlab_knobs:}``, the body of ``--help``: the config groups with their options and
    the chosen one, the experiments, and every typed knob with its value in this composition
    (so ``model=cnn --help`` shows cnn's) and its valid values, from the registries."""
    loader = GlobalHydra.instance().config_loader()  # set: only Hydra's --help resolves this
    groups = [g for g in loader.list_groups("") if g != "hydra"] + list(HYDRA_GROUPS)
    options = {group: sorted(loader.get_group_options(group)) for group in sorted(groups)}
    choices = _root_.hydra.runtime.choices
    rows = [
        (group, choices.get(group) or "(none)", ", ".join(names))
        for group, names in options.items()
    ]
    header = ("group", "chosen", "options")
    parts = [_table("Configuration groups (group=option)", rows, header=header)]
    parts.append(_experiments(options["experiment"]))
    parts.append(KNOBS_LEGEND)
    named = NAMED_VALUES | {"data.name": options["data"]}  # data=<option> sets data.name
    for section in HELP_SECTIONS:
        schema = OmegaConf.get_type(_root_, section) if section else OmegaConf.get_type(_root_)
        where = f"{section}.KEY=VALUE" if section else "KEY=VALUE"
        title = f"{section or 'run'} knobs ({where})"
        parts.append(_table(title, _knob_rows(_root_, section, schema, named)))
    return "\n\n".join(parts).replace("$", "$$")  # Hydra fills the help in as a string.Template


def _knob_rows(
    root: DictConfig, section: str, schema: type, named: dict[str, Iterable[str]]
) -> list[tuple[str, str, str]]:
    """(key, value in ``root``, valid values) for each field of ``schema`` that holds one
    value (TrainConfig's sections and Lightning's dicts are left out)."""
    rows = []
    for field in dataclasses.fields(schema):
        key = f"{section}.{field.name}" if section else field.name
        if not re.search(r"Config\b|dict\[", field.type):
            rows.append((key, _shown(root, key), _valid(key, field, named)))
    return rows


def _valid(key: str, field: dataclasses.Field, named: dict[str, Iterable[str]]) -> str:
    """The names of ``key``'s table or enum, else its type as YAML spells it."""
    if key in named:
        return ", ".join(named[key])
    if isinstance(field.default, enum.Enum):
        return ", ".join(member.value for member in type(field.default))
    return "true, false" if field.type == "bool" else field.type.replace(" | None", ", null")


def _shown(root: DictConfig, key: str) -> str:
    """``key``'s value in ``root`` as YAML writes it, resolved where that needs no run."""
    try:
        value = OmegaConf.select(root, key, throw_on_resolution_failure=True)
    except OmegaConfBaseException:  # ${hydra:...} outside a run: shown unresolved
        parent, _, name = key.rpartition(".")
        value = OmegaConf.to_container(OmegaConf.select(root, parent) if parent else root)[name]
    if OmegaConf.is_list(value) or isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def _experiments(names: list[str]) -> str:
    """Each experiment with the first sentence of its file's comment."""
    rows = [(name, "", _first_sentence(CONF_DIR / "experiment" / f"{name}.yaml")) for name in names]
    return _table("Experiments (experiment=NAME; a sweep with -m)", rows, header=None)


def _first_sentence(path: Path) -> str:
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "@package" not in line:
            comment.append(line.lstrip("# "))
    text = " ".join(comment)
    return re.split(r"(?<=[.?!])\s|:\s", text, maxsplit=1)[0].rstrip(":")


def _table(
    title: str,
    rows: list[tuple[str, str, str]],
    header: tuple[str, str, str] | None = ("knob", "value", "valid values"),
) -> str:
    """Aligned columns under ``== title ==``; the last column wraps within HELP_WIDTH, and a
    value too wide for its column puts the rest of its row on the next line."""
    rows = [header, *rows] if header else rows
    key_width = max(len(key) for key, _, _ in rows)
    value_width = min(max(len(value) for _, value, _ in rows), 14)
    indent = 2 + key_width + 2 + (value_width + 2 if value_width else 0)
    lines = [f"== {title} =="]
    for key, value, valid in rows:
        start = f"  {key:<{key_width}}  {value:<{value_width}}  "[:indent]
        if len(value) > value_width:  # the value alone on a line, the valid values below
            line = f"  {key:<{key_width}}  {value}"
            lines.append(line if len(line) <= HELP_WIDTH else line[: HELP_WIDTH - 3] + "...")
            start = " " * indent
        wrapped = textwrap.wrap(valid, HELP_WIDTH - indent, break_on_hyphens=False) or [""]
        lines.append((start + wrapped[0]).rstrip())
        lines += [" " * indent + more for more in wrapped[1:]]
    return "\n".join(lines)
