"""Every access to Lightning's (and torch's) internals, behind one door.

Lightning offers no public API for these; each is read here only, and
tests/test_compat.py checks each against the installed Lightning, so that an upgrade that
moves one fails there, by name, not as a wrong result in a run. pyproject.toml allows the
Lightning minor versions these were checked with.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers import (
    _MultiProcessingLauncher,
    _SubprocessScriptLauncher,
)
from torch import nn


def should_update_logs(trainer: L.Trainer) -> bool:
    """Whether Lightning hands this training step's ``self.log`` values to the logger
    (every ``log_every_n_steps``, and at a stop): the logger connector's own rule."""
    return trainer._logger_connector.should_update_logs


def stop_after_batch(trainer: L.Trainer) -> bool:
    """Ask Lightning to stop at the end of the current batch, on every DDP rank together,
    as on its own SIGTERM handling (it raises ``SIGTERMException`` there); False where
    this Trainer has no signal connector to ask."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None:
        return False
    connector.received_sigterm = True
    return True


def batches_done(trainer: L.Trainer) -> int:
    """Training batches completed in the current epoch (the fit loop's progress counter)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


def starts_by_script(strategy: Strategy) -> bool:
    """Lightning starts this strategy's workers by running the command line again (ddp)."""
    return isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher)


def starts_by_multiprocessing(strategy: Strategy) -> bool:
    """Lightning starts this strategy's workers with multiprocessing (ddp_spawn, ddp_fork,
    ddp_notebook), whose launcher hands the main process back only the best checkpoint's
    path."""
    return isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher)


def is_compiled(module: nn.Module) -> bool:
    """``module.compile()`` has run on it (torch keeps the compiled forward there)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def drop_compiled(module: nn.Module) -> None:
    """Undo ``module.compile()``: calls go to the plain forward again (torch.export traces it)."""
    module._compiled_call_impl = None
