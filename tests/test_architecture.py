"""The import rules of docs/ARCHITECTURE.md, read from the source with ``ast``: a module that
imports what its place may not fails here, so the picture cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger

from cnnlab.training.job import fit_and_test, prepare
from tests.conftest import REPO

PACKAGE = REPO / "src" / "cnnlab"


def rule(may: str, never: str = "") -> tuple[set[str], set[str]]:
    """The places of cnnlab a place may import (names without ``cnnlab.``; ``*``: any) and
    the libraries it must not."""
    return {name if name == "*" else f"cnnlab.{name}" for name in may.split()}, set(never.split())


# place -> (the places of cnnlab it may import, the libraries it must not import).
# A place is a module or a package; the first place whose name prefixes a module holds it.
RULES: dict[str, tuple[set[str], set[str]]] = {
    "cnnlab.checks": rule("", "torch lightning hydra mlflow omegaconf"),
    "cnnlab.models": rule("checks", "lightning hydra mlflow omegaconf"),
    "cnnlab.data": rule("checks", "hydra mlflow omegaconf"),
    "cnnlab.config": rule("checks models data", "lightning mlflow"),
    "cnnlab.compose": rule("checks config models", "lightning mlflow"),
    "cnnlab.pictures": rule("checks models", "lightning hydra mlflow"),
    "cnnlab.training": rule("checks config models data", "mlflow"),
    "cnnlab.tracking": rule("checks config", "torchvision"),
    "cnnlab.launch": rule("checks training.compat", "mlflow"),
    "cnnlab.report.__main__": rule("checks config cli report tracking"),
    "cnnlab.report": rule("checks models data tracking", "lightning hydra"),
    "cnnlab.cli": rule("checks data tracking", "mlflow"),
    # The race's turns: plain data and the report's tests; the Hydra sweeper drives it.
    "cnnlab.racing": rule("checks report", "torch lightning hydra mlflow"),
    "cnnlab.summary": rule("checks cli compose config data models", "lightning mlflow"),
    # The job's plan: reads the store through tracking (MlflowClient appears as a type).
    "cnnlab.plan": rule("checks compose config launch.runtime tracking training.job", "torch"),
    "cnnlab.train": rule("*"),  # the entry point: anything
    "cnnlab.eval": rule("*"),  # the entry point of an evaluation: anything
}
# Imported by no module of cnnlab (only by Hydra, the command line and the tests).
ENTRY_POINTS = ("cnnlab.train", "cnnlab.eval", "cnnlab.summary", "cnnlab.report.__main__")
# Private Lightning internals are reached only through the one door.
COMPAT = "cnnlab.training.compat"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def place_of(name: str) -> str | None:
    for place in sorted(RULES, key=len, reverse=True):
        if name == place or name.startswith(place + "."):
            return place
    return None


def imports(path: Path, known: set[str]) -> list[str]:
    """Every module ``path`` imports: ``from a import b`` counts ``a.b`` where that is a
    module of cnnlab, else ``a``."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append(submodule if submodule in known else node.module)
    return found


def cnnlab_modules() -> set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py")}


SOURCES = sorted(set(PACKAGE.rglob("*.py")) - {PACKAGE / "__init__.py"})


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_place_may(path: Path) -> None:
    name = module_name(path)
    place = place_of(name)
    assert place is not None, f"{name} is in no place of docs/ARCHITECTURE.md"
    allowed, banned = RULES[place]
    known = cnnlab_modules()
    wrong = []
    for imported in imports(path, known):
        if imported.startswith("cnnlab"):
            target = place_of(imported) or imported
            own = target == place or imported.startswith(place + ".")
            if imported in ENTRY_POINTS or not (
                own or "*" in allowed or target in allowed or imported in allowed
            ):
                wrong.append(imported)
        elif imported.split(".")[0] in banned:
            wrong.append(imported)
        elif "._" in imported and imported.startswith("lightning") and name != COMPAT:
            wrong.append(imported)  # Lightning's private modules: only through compat
    assert not wrong, f"{name} ({place}) may not import {sorted(set(wrong))}"


def test_private_lightning_attributes_are_read_only_in_compat() -> None:
    private = re.compile(r"\.(_logger_connector|_signal_connector|_compiled_call_impl)\b")
    outside = [
        str(path.relative_to(PACKAGE))
        for path in SOURCES
        if module_name(path) != COMPAT and private.search(path.read_text())
    ]
    assert not outside


def test_the_architecture_document_names_every_place() -> None:
    document = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    names = [place.removeprefix("cnnlab.").replace(".", "/") for place in RULES]
    missing = [name for name in names if f"`{name}" not in document]
    assert not missing


def test_a_job_is_prepared_and_trained_without_a_hydra_runtime(small_cfg, tmp_path: Path) -> None:
    # As in a notebook: the config is composed, and no Hydra app is running afterwards.
    cfg = small_cfg(["trainer.max_epochs=1"])
    HydraConfig.instance().cfg = None
    assert not HydraConfig.initialized()
    result = fit_and_test(prepare(cfg, logger=CSVLogger(tmp_path / "csv")))
    assert 0.0 <= result.test_acc <= 1.0 and result.step > 0
