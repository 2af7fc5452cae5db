"""Build the wheel folder the GPU check installs from offline: ``make gpu-wheels``.

Into bench/gpu_wheels/ (gitignored; the device run carries it): one wheel per distribution of
bench/gpu_requirements.txt at the version this environment runs, for CPython 3.12 on
manylinux x86_64, binary only, except ``antlr4-python3-runtime``, built here with ``pip
wheel`` (PyPI has only its sdist); a metadata-only ``mlflow`` wheel (no code: it names
mlflow-skinny's tracking client as ``mlflow``, whose version cnnlab records in each run);
and in build/ the tools that install cnnlab editable there (hatchling and its needs). Prints
each wheel's size and fails when the folder is over 50 MiB: the whole working tree that
travels must stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu_setup import WHEELS

REQUIREMENTS = Path(__file__).with_name("gpu_requirements.txt")
BUILT_HERE = {"antlr4-python3-runtime"}  # PyPI has only its sdist
# cnnlab's build backend (pyproject.toml) and what it needs to build an editable wheel.
BUILD_TOOLS = ("hatchling>=1.25", "editables", "tomlkit", "trove-classifiers", "pathspec",
               "pluggy", "packaging")  # fmt: skip
MAX_MIB = 50
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          "--abi", "abi3", "--abi", "none", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
          "--platform", "any", "--only-binary", ":all:"]  # fmt: skip
SHIM = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "mlflow"
version = "{version}"
description = "Metadata only: mlflow-skinny's tracking client, named mlflow (cnnlab's GPU check)"
dependencies = ["mlflow-skinny=={version}"]

[tool.hatch.build.targets.wheel]
bypass-selection = true
"""


def requirements() -> list[str]:
    """The names of bench/gpu_requirements.txt, comments dropped."""
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def pinned(names: list[str]) -> list[str]:
    """``name==version`` as installed here."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"gpu-wheels: {name} is not installed here; run `make install` first")
    return pins


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def build(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    tools = folder / "build"
    tools.mkdir(parents=True)
    pins = pinned(requirements())
    binary = [p for p in pins if p.split("==")[0] not in BUILT_HERE]
    pip("download", "--quiet", "--no-deps", *TARGET, "--dest", str(folder), *binary)
    for pin in sorted(set(pins) - set(binary)):
        pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), pin)
    pip("download", "--quiet", "--no-deps", *TARGET, "--dest", str(tools), *BUILD_TOOLS)
    with tempfile.TemporaryDirectory() as shim:  # built offline, with the hatchling above
        Path(shim, "pyproject.toml").write_text(
            SHIM.format(version=importlib.metadata.version("mlflow-skinny"))
        )
        pip("wheel", "--quiet", "--no-deps", "--no-index", "--find-links", str(tools),
            "--wheel-dir", str(folder), shim)  # fmt: skip


def check(folder: Path) -> float:
    """Print each wheel and the total; exit 1 on two versions of one distribution or a
    folder over MAX_MIB. Returns the size in MiB."""
    wheels = sorted(folder.rglob("*.whl"))
    names = [re.split(r"-\d", w.name, maxsplit=1)[0].lower() for w in wheels]
    doubles = sorted({n for n in names if names.count(n) > 1})
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.relative_to(folder)}")
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{size:8.2f} MiB  in {len(wheels)} wheels, {folder} (limit {MAX_MIB} MiB)")
    if doubles:
        sys.exit(f"gpu-wheels: two versions of {', '.join(doubles)}: pip would refuse them")
    if size > MAX_MIB:
        sys.exit(f"gpu-wheels: {size:.1f} MiB is over {MAX_MIB} MiB; the tree must travel too")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WHEELS, help="the folder (emptied first)")
    args = parser.parse_args()
    build(args.out)
    check(args.out)


if __name__ == "__main__":
    main()
