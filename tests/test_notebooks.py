"""Every notebook under notebooks/ runs top to bottom on the installed package, and is kept
in git without outputs. A notebook whose name contains "compare" reads a real MLflow sweep,
made once per module and only when such a notebook runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

from tests.conftest import REPO, run_sweep

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds per cell; every cell of the notebooks takes a few at most
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Quiets debugpy's "frozen modules" warning, printed by every kernel on Python >= 3.11.
KERNEL_ENV = {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def needs_sweep(path: Path) -> bool:
    return "compare" in path.stem


def notebook_params(paths: list[Path]) -> list:
    return [
        pytest.param(path, id=path.name, marks=[pytest.mark.slow] if needs_sweep(path) else [])
        for path in paths
    ]


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny real pooling sweep (2 poolings x 2 seeds), for the notebooks that compare runs."""
    root = tmp_path_factory.mktemp("sweep")
    result, _, _, children = run_sweep(
        root, "experiment=pooling_ablation", "model.pooling=max,avg", "seed=0,1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(children) == 4
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "sweep"}


def execute(path: Path, env: dict[str, str]) -> None:
    """Run every cell of ``path`` in a fresh kernel started in notebooks/; fail the test with
    the failing cell and its error."""
    notebook = nbformat.read(path, as_version=4)
    # ipykernel's own kernel spec, which runs sys.executable (this venv's python), with no
    # kernel directory searched: a "python3" kernel registered elsewhere cannot take over.
    kernel = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[])
    )
    client = NotebookClient(
        notebook,
        km=kernel,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute(env={**os.environ, **KERNEL_ENV, **env})
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
        pytest.fail(f"{path.name}: {ANSI_ESCAPE.sub('', str(error))}", pytrace=False)


def test_notebooks_are_found() -> None:
    assert {"01_building_blocks.ipynb", "03_model_zoo.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_notebook_runs(path: Path, request: pytest.FixtureRequest) -> None:
    env = request.getfixturevalue("sweep_env") if needs_sweep(path) else {}
    execute(path, env)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} keep outputs; clear them before committing"
