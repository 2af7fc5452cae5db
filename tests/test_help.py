"""``python -m cnnlab.train --help``: every knob of cnnlab with its valid values, read from the
registries (so help cannot drift from the code) and its value under the command line given."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cnnlab.config import COMPILE_MODES, MATMUL_PRECISIONS, DataSource, MemoryFormat
from cnnlab.data.sources import DATASETS
from cnnlab.models import PRESETS
from cnnlab.models.heads import HEADS
from cnnlab.models.layers import ACTIVATIONS, CONVS
from cnnlab.models.pooling import POOLINGS
from tests.conftest import REPO

CONF = REPO / "conf"
# knob -> the table (or enum) whose names are its valid values
REGISTRIES = {
    "model.name": list(PRESETS),
    "model.pooling": list(POOLINGS),
    "model.head": list(HEADS),
    "model.activation": list(ACTIVATIONS),
    "model.conv": list(CONVS),
    "data.source": [source.value for source in DataSource],
    "perf.memory_format": [fmt.value for fmt in MemoryFormat],
    "perf.compile_mode": list(COMPILE_MODES),
    "perf.matmul_precision": list(MATMUL_PRECISIONS),
}


def train_help(*overrides: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cnnlab.train", *overrides, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def help_text() -> str:
    return train_help()


def row(text: str, key: str) -> list[str]:
    """The words after ``key`` in its row of a table, wrapped lines included (the value
    first, then the valid values; commas dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [key])
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):  # wrapped: deeper than a row
        end += 1
    return re.split(r"[,\s]+", " ".join(lines[start:end]).strip())[1:]


def names_in(conf_group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / conf_group).glob("*.yaml"))


@pytest.mark.parametrize("key", REGISTRIES)
def test_a_named_knob_lists_every_name_of_its_registry(help_text: str, key: str) -> None:
    value, *valid = row(help_text, key)
    assert valid == REGISTRIES[key]
    assert value in valid  # the default is one of them


@pytest.mark.parametrize(
    ("group", "options"),
    [
        ("model", sorted(PRESETS)),
        ("data", sorted(DATASETS)),
        ("experiment", names_in("experiment")),
        ("trainer", names_in("trainer")),
        ("hparams_search", names_in("hparams_search")),
        ("debug", names_in("debug")),
        # Hydra's own options and cnnlab's (conf/hydra/... and the racing plugin)
        ("hydra/launcher", sorted({"basic", *names_in("hydra/launcher")})),
        ("hydra/sweeper", sorted({"basic", "racing", *names_in("hydra/sweeper")})),
    ],
)
def test_every_config_group_lists_its_options(help_text: str, group: str, options) -> None:
    chosen, *listed = row(help_text, group)
    assert set(options) <= set(listed)
    assert chosen in {*listed, "(none)"}


def test_every_experiment_is_described_by_its_file(help_text: str) -> None:
    section = help_text.split("== Experiments")[1].split("\n\n")[0]
    for name in names_in("experiment"):
        description = " ".join(row(section, name))
        assert len(description) > 10, name  # the first sentence of its comment


def test_values_are_those_of_the_command_line(help_text: str) -> None:
    assert row(help_text, "model")[0] == "lenet5"
    assert row(help_text, "model.dropout")[0] == str(PRESETS["lenet5"].knobs["dropout"])
    assert row(help_text, "hydra/sweeper")[0] == "grid"  # conf/hydra/default.yaml's
    text = train_help(
        "model=cnn",
        "model.activation=gelu",
        "data=cifar10",
        "logger.run_name=cost$5",  # Hydra's help is a string.Template: "$" must come through
        "logger.experiment_name=${oc.env:CNNLAB_UNSET_VARIABLE}",  # unresolvable: shown as is
    )
    assert row(text, "model")[0] == "cnn" and row(text, "model.name")[0] == "cnn"
    assert row(text, "model.head")[0] == PRESETS["cnn"].knobs["head"]
    assert row(text, "model.activation")[0] == "gelu"
    assert row(text, "data.source")[0] == "torchvision"
    assert row(text, "logger.run_name")[0] == "cost$5"
    assert row(text, "logger.experiment_name")[0] == "${oc.env:CNNLAB_UNSET_VARIABLE}"


def test_help_is_readable(help_text: str) -> None:
    lines = help_text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "$" not in help_text and "None" not in help_text  # Hydra's template filled in; YAML
    usage = help_text.split("== ")[0]
    assert "python -m cnnlab.train -m experiment=pooling_ablation seed=1,2,3" in usage
    assert "python -m cnnlab.report" in usage
