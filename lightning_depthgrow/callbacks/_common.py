"""Old home of the callbacks' shared plumbing, kept so existing imports keep working.

Everything here is a re-export: the plumbing lives in :mod:`lightning_depthgrow.callbacks.plumbing`, the event
log and its checkpoint persistence in :mod:`lightning_depthgrow.events`, the growth schedule in
:class:`lightning_depthgrow.growth.Schedule`, and the callback base in :mod:`lightning_depthgrow.callbacks.base`.
"""

from __future__ import annotations

import lightning.pytorch as pl

from ..events import CHECKPOINT_KEY, event_log, load_checkpoint_events, save_event_log
from ..growth import Schedule
from .plumbing import (
    all_reduce_mean,
    apply_and_sync,
    broadcast,
    check_not_compiled,
    check_strategy_supported,
    guard_spawn_results,
    is_last_training_batch,
    lr_scale,
    restore_architecture,
    rewrap_ddp,
    setup_for_fit,
    sync_trainer,
)

__all__ = [
    "CHECKPOINT_KEY",
    "all_reduce_mean",
    "apply_and_sync",
    "broadcast",
    "check_not_compiled",
    "check_strategy_supported",
    "event_log",
    "guard_spawn_results",
    "is_growth_epoch",
    "is_last_training_batch",
    "load_checkpoint_events",
    "lr_scale",
    "restore_architecture",
    "rewrap_ddp",
    "save_event_log",
    "setup_for_fit",
    "sync_trainer",
]


def is_growth_epoch(trainer: pl.Trainer, warmup_epochs: int, grow_every: int, last_growth_epoch: int) -> bool:
    """Whether the current epoch ends with growth (see :meth:`lightning_depthgrow.growth.Schedule.is_due`)."""
    return Schedule(warmup_epochs, grow_every).is_due(trainer.current_epoch, trainer.max_epochs, last_growth_epoch)
