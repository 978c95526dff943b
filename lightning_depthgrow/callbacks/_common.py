"""Plumbing shared by the callbacks: event log on the module, DDP sync, checkpoint replay.

One path applies every architecture change inside a Trainer (:func:`apply_and_sync`), whether it is
decided now or replayed from a checkpoint (:func:`restore_architecture`).
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from ..events import AppliedChange, ArchitectureEvent, apply_event, replay_events
from ..surgery.optim import sync_schedulers, update_optimizer

CHECKPOINT_KEY = "lightning_depthgrow"
_LOG_ATTR = "_depthgrow_event_log"
_RESTORED_ATTR = "_depthgrow_restored_from"
_HOOK_ATTR = "_depthgrow_restore_hook"


def event_log(module: torch.nn.Module) -> list[ArchitectureEvent]:
    """The architecture event log carried by ``module`` (created empty on first use)."""
    log = module.__dict__.get(_LOG_ATTR)
    if log is None:
        log = []
        module.__dict__[_LOG_ATTR] = log
    return log


def setup_for_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, who: str) -> bool:
    """Start of an architecture-changing callback's ``setup``; returns whether training (and change) follows.

    Outside ``fit`` (``validate/test/predict(fresh_module, ckpt_path=<changed checkpoint>)``) it only rebuilds the
    architecture before Lightning loads the checkpoint's weights. For ``fit`` it rejects what cannot be mutated;
    the caller measures its starting size and then calls :func:`restore_architecture`.
    """
    if stage != "fit":
        restore_architecture(trainer, pl_module)
        return False
    check_strategy_supported(trainer, who)
    check_not_compiled(trainer, pl_module, who)
    return True


def check_strategy_supported(trainer: pl.Trainer, who: str) -> None:
    """Reject sharded strategies, whose parameters we cannot mutate in place (yet)."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
        raise RuntimeError(
            f"{who} does not support the {name} strategy: it shards or compiles parameters, so blocks "
            "cannot be added or sliced in place. Use strategy='ddp' (or 'ddp_spawn') or a single device."
        )


def check_not_compiled(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Raise if ``pl_module`` or any sub-module is ``torch.compile``d: the graph would keep the old architecture."""
    compiled = [n for n, m in pl_module.named_modules() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)]
    if compiled or getattr(trainer.strategy, "_compiled", False):
        raise RuntimeError(
            f"{who} cannot mutate a torch.compile'd model ({compiled or 'the whole module'}): the compiled "
            "graph would silently keep the old architecture. Train without torch.compile, or compile only "
            "after growth/export has finished."
        )


def all_reduce_mean(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity on one process)."""
    if trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor.clone(), reduce_op="mean")


def broadcast(trainer: pl.Trainer, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, so every rank makes the identical decision."""
    if trainer.world_size <= 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


def rewrap_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Rebuild the DDP wrapper after the parameter set changed.

    DDP snapshots its parameters at construction: added ones would never be synchronised. The
    strategy's own ``configure_ddp`` re-wraps with the user's DDP settings and broadcasts rank 0's
    weights and buffers.
    """
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = pl_module
        strategy.configure_ddp()


def apply_and_sync(
    trainer: pl.Trainer | None, pl_module: pl.LightningModule, event: ArchitectureEvent
) -> AppliedChange:
    """Apply ``event`` to the unwrapped module, then bring optimizers, schedulers and DDP in line.

    The event is appended to the module's event log only after it applied cleanly.
    """
    change = apply_event(pl_module, event)
    event_log(pl_module).append(event)
    if trainer is not None:
        sync_trainer(trainer, pl_module, change)
    return change


def sync_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, change: AppliedChange) -> None:
    """Update every optimizer and LR scheduler for ``change`` and rebuild DDP."""
    if not change.changes_parameter_set:
        return
    schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    for optimizer in trainer.optimizers:
        update_optimizer(optimizer, change, pl_module)
        sync_schedulers(schedulers, optimizer)
    rewrap_ddp(trainer, pl_module)


def load_checkpoint_events(path: str) -> list[ArchitectureEvent]:
    """The architecture event log stored in a Lightning checkpoint (empty if it has none)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return [ArchitectureEvent.from_dict(e) for e in checkpoint.get(CHECKPOINT_KEY, {}).get("events", [])]


def restore_architecture(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[AppliedChange]:
    """Replay a resumed checkpoint's event log on the fresh module, once, from a callback's ``setup``.

    Lightning loads model weights right after ``setup`` and builds optimizers from the module after
    that, so the rebuilt architecture is in place for both. Lightning 2.6 only sets ``trainer.ckpt_path``
    after ``setup``, just before it loads the weights: while the path is unknown, a ``load_state_dict``
    pre-hook on the module replays the log at that moment instead (still before weights and optimizers).
    """
    path = trainer.ckpt_path
    if not path:
        _replay_when_weights_load(trainer, pl_module)
        return []
    if pl_module.__dict__.get(_RESTORED_ATTR) == path:
        return []
    pl_module.__dict__[_RESTORED_ATTR] = path
    events = load_checkpoint_events(path)
    log = event_log(pl_module)
    if log:
        if [e.to_dict() for e in log] != [e.to_dict() for e in events[: len(log)]]:
            # E.g. trainer.test(ckpt_path="best") after fit, where the best checkpoint predates the last growth.
            raise RuntimeError(
                f"The module already carries {len(log)} architecture event(s) that the checkpoint {path} "
                f"({len(events)} event(s)) does not start with, e.g. it was saved before the module's latest "
                "growth. Pass a freshly constructed starting model: trainer.fit/validate/test/predict(fresh_model, "
                "ckpt_path=...) or lightning_depthgrow.load_grown(fresh_model, ckpt_path)."
            )
        events = events[len(log) :]
    _dry_run(trainer, pl_module, events)
    changes = replay_events(pl_module, events)
    log.extend(events)
    if events:
        rank_zero_info(f"lightning_depthgrow: replayed {len(events)} architecture event(s) from {path}")
    return changes


def _dry_run(trainer: pl.Trainer, pl_module: pl.LightningModule, events: list[ArchitectureEvent]) -> None:
    """Replay ``events`` on a copy first, so a log that does not fit raises with the module left untouched."""
    if not events:
        return
    try:
        probe = copy.deepcopy(pl_module, memo={id(trainer): None})  # the copy must not drag the Trainer along
    except Exception:  # a module holding something uncopyable: validate on the real module, as before
        return
    replay_events(probe, events)


def _replay_when_weights_load(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Register (once per module, replacing an earlier one) the pre-hook that replays on checkpoint load."""
    previous = pl_module.__dict__.pop(_HOOK_ATTR, None)
    if previous is not None:
        previous.remove()

    def hook(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        # Only the trainer's own restore of the whole module, once its checkpoint path is known.
        if prefix == "" and trainer.ckpt_path and trainer.lightning_module is module:
            restore_architecture(trainer, pl_module)

    pl_module.__dict__[_HOOK_ATTR] = pl_module.register_load_state_dict_pre_hook(hook)


def save_event_log(checkpoint: dict[str, Any], pl_module: pl.LightningModule) -> None:
    """Store the module's event log in a checkpoint dict (idempotent; any of our callbacks may call it)."""
    checkpoint[CHECKPOINT_KEY] = {"version": 1, "events": [e.to_dict() for e in event_log(pl_module)]}


def guard_spawn_results(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Call from ``teardown``: keep ``ddp_spawn`` from copying a changed architecture's weights into the parent.

    With ``ddp_spawn`` Lightning loads rank 0's final ``state_dict`` into the main process's module with
    ``strict=False``. That module never saw the workers' architecture events: sliced tensors would not fit,
    and grown blocks would be silently dropped, leaving a mixed model. Send nothing instead and say how to get
    the trained model (its checkpoint replays the event log).
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    guarded = pl_module.__dict__.get("_depthgrow_spawn_guard") is not None
    if guarded or not isinstance(launcher, _MultiProcessingLauncher) or not event_log(pl_module):
        return
    pl_module.__dict__["_depthgrow_spawn_guard"] = pl_module.register_state_dict_post_hook(_send_nothing)
    rank_zero_warn(
        f"{who} changed the architecture inside ddp_spawn workers; the main process's module keeps its original "
        "architecture and weights. Load the trained model with lightning_depthgrow.load_grown(fresh_model, "
        "checkpoint_path), or use strategy='ddp', whose rank 0 is the main process."
    )


def _send_nothing(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.clear()


def is_growth_epoch(trainer: pl.Trainer, warmup_epochs: int, grow_every: int, last_growth_epoch: int) -> bool:
    """Whether the current epoch ends with growth: after ``warmup_epochs``, every ``grow_every`` epochs, never twice
    in one epoch, and never in the last epoch (an addition that is never trained only costs)."""
    epoch = trainer.current_epoch
    done = epoch + 1
    warmup = max(1, warmup_epochs)
    if epoch <= last_growth_epoch or done < warmup:
        return False
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= done:
        return False
    return (done - warmup) % grow_every == 0


def is_last_training_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True on the epoch's last training batch: growth happens after its optimizer step, before validation and
    checkpointing, so a checkpoint saved at the epoch's end already holds the change (resume starts the next epoch)."""
    is_last = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
    return is_last or batch_idx + 1 >= trainer.num_training_batches


def lr_scale(trainer: pl.Trainer) -> float:
    """Current lr / initial lr of the first param group (the paper scales each growth step's budget by it)."""
    if not trainer.optimizers:
        return 1.0
    group = trainer.optimizers[0].param_groups[0]
    initial = group.get("initial_lr", group["lr"])
    return float(group["lr"]) / float(initial) if initial else 1.0
