"""A job's identity: what decides its result, as one hash (tag ``cnnlab.config_hash``).

Two runs with one identity trained the same configuration with the same code: a sweep that
continues skips a job whose identity already FINISHED, and ``sweep.reuse=true`` takes the
result of any run of that identity in the experiment (cnnlab.tracking.continuation).

In the identity: every setting of the resolved config (model, data, optimizer, scheduler,
trainer length and precision, callbacks that choose the tested checkpoint, seed,
augmentation, label smoothing, test) but those in :data:`NOT_DECIDING`, plus the code
version (:func:`code_version`). A setting nobody listed is in: an unknown one costs a job
trained again, never a result taken for another's. Library versions are recorded as tags
(``version.*``) but are not in it: a patch release of torch would otherwise orphan every
finished study.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab.config import REPO_ROOT

HASH_TAG = "cnnlab.config_hash"
GROUP_TAG = "cnnlab.group_hash"  # the identity but the seed: one group of a study
CODE_TAG = "cnnlab.code_version"

# Settings left out of the identity (dotted keys; a key leaves out all below it), and why
# none of them changes what a run measures. README "Continue a sweep" lists them too.
NOT_DECIDING = {
    "paths": "where output goes",
    "logger": "where and how often the run is recorded (tracking URI, cadence, pictures)",
    "resume": "which run continues, not what it trains",
    "sweep": "how a sweep treats its jobs",
    "task_name": "names the output folder",
    "perf": "speed only: changes nothing beyond floating-point rounding (training.perf)",
    "data.root": "where the files are (which data: data.name and data.source are in)",
    "data.download": "whether missing files are fetched",
    "data.eval_batch_size": "evaluation in eval mode counts the same in any batch size",
    "data.resident": "where batches are gathered: the same batches",
    "trainer.enable_progress_bar": "display",
    "trainer.enable_model_summary": "display",
    "trainer.log_every_n_steps": "logging cadence",
    "callbacks.progress_bar": "display",
    "callbacks.learning_rate_monitor": "logging",
    "callbacks.model_checkpoint.dirpath": "where checkpoints go",
    "callbacks.model_checkpoint.filename": "what checkpoints are called",
}


@dataclass(frozen=True)
class Identity:
    settings_hash: str  # of the deciding settings alone
    seedless_hash: str  # of the deciding settings but the seed
    code: str  # the code version they ran with

    @property
    def config_hash(self) -> str:
        return _sha256(f"{self.settings_hash}\n{self.code}")

    @property
    def group_hash(self) -> str:
        """Runs that differ only by their seed share it, whichever sweep ran them: the report
        pools several sweeps by it, not by the ``group`` tag, which names what was swept."""
        return _sha256(f"{self.seedless_hash}\n{self.code}")

    def tags(self) -> dict[str, str]:
        return {HASH_TAG: self.config_hash, GROUP_TAG: self.group_hash, CODE_TAG: self.code}


def identity(cfg: DictConfig, code: str) -> Identity:
    settings = deciding(cfg)
    seedless = {key: value for key, value in settings.items() if key != "seed"}
    return Identity(_hash_of(settings), _hash_of(seedless), code)


def of_job(cfg: DictConfig, code: str | None = None) -> Identity:
    """The identity of a job of ``cfg``, with the code of the cnnlab checkout running it
    (or ``code``, worked out once for many jobs)."""
    if code is None:
        ignore_dirty = bool(OmegaConf.select(cfg, "sweep.ignore_dirty", default=False))
        code = code_version(REPO_ROOT, dirty_is_commit=ignore_dirty)
    return identity(cfg, code)


def deciding(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that decide the result: ``cfg`` without :data:`NOT_DECIDING`.
    They are left out before resolving, so what they interpolate (the output folder from
    Hydra's runtime) need not resolve."""
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    tree.pop("hydra", None)
    for key in NOT_DECIDING:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)


def code_version(folder: Path, *, dirty_is_commit: bool = False) -> str:
    """The commit checked out in ``folder``; with uncommitted changes to tracked files, the
    commit and a hash of the diff (the same edit gives the same version), unless
    ``dirty_is_commit``. Outside git: the installed cnnlab's version."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = "" if dirty_is_commit else git("diff", "HEAD", "--no-ext-diff", "--binary")
    except (OSError, subprocess.CalledProcessError):
        return f"cnnlab {importlib.metadata.version('cnnlab')}"
    return f"{commit}+dirty.{_sha256(diff)[:12]}" if diff else commit


def _hash_of(settings: dict[str, Any]) -> str:
    return _sha256(json.dumps(settings, sort_keys=True))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
