"""The GPU check's set-up: the packages of cnnlab's train path that the machine lacks,
installed offline from the wheel folder that ``make gpu-wheels`` builds (bench/gpu_wheels).

The GPU machine has Python 3.12 with torch, torchvision, lightning, torchmetrics and the
packages of bench/gpu_base.txt, no internet, and its ``python3`` is itself a virtual
environment (/opt/torch/.venv): a ``--user`` install is refused there, and a venv made with
``--system-site-packages`` would see the base interpreter's packages, not torch. So the
wheels go into a folder of their own (``pip install --target``, every wheel, no dependency
resolution: the folder holds exactly what is missing) that the check's processes find first
on ``PYTHONPATH``; the machine's own environment is never written to. cnnlab runs from the
checkout's ``src`` (its config folder is found beside it), and is installed editable into
the same folder only for its metadata: a copy of the checkout without ``.git`` names its
code by the installed version (cnnlab.tracking.identity).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "bench" / "gpu_wheels"
# Modules and distributions the check needs; any one missing means the set-up runs.
MODULES = ("hydra", "omegaconf", "mlflow", "sqlalchemy", "alembic", "torchinfo", "mlxtend",
           "hydra_plugins.hydra_joblib_launcher", "cnnlab")  # fmt: skip
DISTRIBUTIONS = ("mlflow", "cnnlab")  # read by version() in cnnlab.tracking


class SetupError(RuntimeError):
    """The packages could not be installed; the message says why and what to do."""


def missing() -> list[str]:
    """The needed modules and distributions this interpreter cannot find."""
    absent = [name for name in MODULES if not _findable(name)]
    for name in DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(f"{name} (distribution)")
    return absent


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def install(wheels: Path, site: Path, log: Path, timeout: float) -> dict:
    """Every wheel of ``wheels`` and cnnlab (editable) into ``site``, from that folder alone
    (no index, no configuration or PIP_* variables of this machine), within ``timeout``
    seconds; pip's output goes to ``log``. Returns what was installed."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SetupError(
            f"no wheels in {wheels}: run `make gpu-wheels` where PyPI is reachable and carry "
            f"that folder to this machine (it is gitignored)"
        )
    shutil.rmtree(site, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--no-index",
               "--no-deps", "--find-links", str(wheels / "build"), "--target", str(site),
               *map(str, found), "--editable", str(REPO)]  # fmt: skip
    with log.open("a") as out:
        out.write(f"\n=== set-up: {' '.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=offline_env(), timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SetupError(f"pip install from {wheels} took over {timeout} s") from None
    if done.returncode != 0:
        raise SetupError(f"pip install from {wheels} failed (exit {done.returncode}); see {log}")
    activate(site)
    return {"wheels": len(found), "from": str(wheels), "into": str(site),
            "unmet": unmet_requirements(site, log)}  # fmt: skip


def offline_env() -> dict[str, str]:
    """This environment without pip's settings: the wheel folder is the only source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def activate(site: Path | None) -> None:
    """Put ``site`` (if any), cnnlab's ``src`` and the checkout (for ``bench``) first on
    this process's path and on its children's ``PYTHONPATH``."""
    entries = [str(REPO / "src"), *([str(site)] if site else []), str(REPO)]
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    importlib.invalidate_caches()
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries + inherited))


def unmet_requirements(site: Path, log: Path) -> list[str]:
    """``pip check``'s version conflicts of the distributions installed into ``site`` (a
    version on this machine that one of them does not accept), also written to ``log``: the
    run may still work, but a failure that follows is explained there. Requirements left out
    on purpose (bench/gpu_requirements.txt) are not installed, and not listed."""
    ours = {d.metadata["Name"].lower() for d in importlib.metadata.distributions(path=[str(site)])}
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                          text=True, env=offline_env())  # fmt: skip
    lines = [line for line in done.stdout.splitlines()
             if line.split(" ")[0].lower() in ours and " has requirement " in line]  # fmt: skip
    with log.open("a") as out:
        out.write("=== set-up: pip check, for the installed wheels\n")
        out.write("\n".join(lines or ["(no unmet requirement)"]) + "\n")
    return lines
