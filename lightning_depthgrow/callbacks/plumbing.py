"""What every architecture-changing callback needs from Lightning: preflight checks, rank sync, apply + sync.

:class:`~lightning_depthgrow.callbacks.base.ArchitectureCallback` uses these; they are public for callbacks that
cannot derive from it. One path applies every change inside a Trainer (:func:`apply_and_sync`), whether it is
decided now or replayed from a checkpoint (:func:`restore_architecture`). Nothing here stays on the user's module
after ``fit``: the checkpoint pre-hook and the forward-input recorder are removed by :func:`release_module`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from ..events import (
    AppliedChange,
    ArchitectureEvent,
    apply_event,
    checkpoint_events,
    event_log,
    pending_events,
    read_checkpoint,
    replay_checked,
)
from ..surgery.optim import sync_schedulers, update_optimizer

# The checkpoint pre-hook of each module, kept here (not on the module) and removed at teardown.
_RESTORE_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- preflight


def check_strategy_supported(trainer: pl.Trainer, who: str) -> None:
    """Reject sharded strategies, whose parameters we cannot mutate in place (yet)."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
        raise RuntimeError(
            f"{who} does not support the {name} strategy: it shards or compiles parameters, so blocks "
            "cannot be added or sliced in place. Use strategy='ddp' (or 'ddp_spawn') or a single device."
        )


def setup_for_fit(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, who: str) -> bool:
    """Start of an architecture-changing callback's ``setup``; returns whether training (and change) follows.

    Outside ``fit`` (``validate/test/predict(fresh_module, ckpt_path=<changed checkpoint>)``) it only rebuilds the
    architecture before Lightning loads the checkpoint's weights. For ``fit`` it rejects what cannot be mutated.
    """
    check_strategy_supported(trainer, who)
    if stage != "fit":
        restore_architecture(trainer, pl_module)
        return False
    check_not_compiled(trainer, pl_module, who)
    return True


def example_input(pl_module: torch.nn.Module, given: Any = None, batch: Any = None, *, sample: bool = False) -> Any:
    """An input ``pl_module`` can be called on, or ``None``: the one input helper of every callback.

    In order: ``given`` (a callback's ``example_input=``), ``pl_module.example_input_array``, the inputs of the
    module's most recent forward call during ``fit`` (recorded once a callback called :func:`capture_inputs`), else
    the first tensor of ``batch`` cut to one row (a guess at the model input: callers that run the module on it say
    so in their messages). ``sample=True`` cuts a recorded call to its first sample too (every tensor with a batch
    dimension), for counts per sample; a given input or ``example_input_array`` is returned as it is.

    Example:
        >>> import lightning.pytorch as pl
        >>> module = pl.LightningModule()
        >>> example_input(module, batch=(torch.ones(4, 3), torch.zeros(4))).shape
        torch.Size([1, 3])
        >>> example_input(module) is None
        True
    """
    if given is not None:
        return given
    array = getattr(pl_module, "example_input_array", None)
    if array is not None:
        return array
    recorded = captured_input(pl_module)
    if recorded is not None:
        return _first_rows(recorded) if sample else recorded
    tensor = _first_tensor(batch)
    return None if tensor is None else tensor[:1].detach().clone()


def require_example_input(pl_module: pl.LightningModule, given: Any, what: str) -> Any:
    """``given`` (a callback's ``example_input=``), else ``pl_module.example_input_array``; ``ValueError`` saying
    ``what`` needs it and how to provide it when neither is set."""
    example = given if given is not None else pl_module.example_input_array
    if example is None:
        raise ValueError(
            f"{what} needs an example input: set pl_module.example_input_array (one batch of model inputs) or "
            "pass example_input=..."
        )
    return example


# The forward-input recorder of each module, kept here (not on the module) and removed by release_module.
_CAPTURES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[RemovableHandle, _InputRecorder]] = (
    weakref.WeakKeyDictionary()
)


class _InputRecorder:
    """A forward pre-hook keeping the (detached) inputs of the module's most recent call.

    Only references are kept (the batch of the step just trained); a copy of the hook (``deepcopy``/``pickle`` of
    the module during ``fit``) is inert and holds nothing.
    """

    def __init__(self) -> None:
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.call = (_detached(args), _detached(kwargs))

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _inert_hook, ()


def capture_inputs(pl_module: torch.nn.Module) -> None:
    """Record the inputs of every forward call of ``pl_module`` (the latest one is kept) until
    :func:`release_module`; :func:`captured_input` and :func:`example_input` read them. Idempotent."""
    if pl_module in _CAPTURES:
        return
    recorder = _InputRecorder()
    _CAPTURES[pl_module] = (pl_module.register_forward_pre_hook(recorder, with_kwargs=True), recorder)


def captured_input(pl_module: torch.nn.Module) -> Any:
    """The inputs of ``pl_module``'s most recent forward call since :func:`capture_inputs`, as an example input
    (a tensor, a tuple of positional arguments, or a dict of keyword arguments), else ``None``: no call yet, or one
    whose arguments cannot be written as one of those (positional and keyword arguments that do not bind by name).
    The tensors are copies, so running the module on them cannot change the batch it was trained on.
    """
    entry = _CAPTURES.get(pl_module)
    call = None if entry is None else entry[1].call
    if call is None:
        return None
    args, kwargs = _cloned(call)  # a copy: the module may modify its input in place, and the batch is the user's
    if not kwargs:
        single = len(args) == 1 and not isinstance(args[0], (tuple, list, Mapping))
        return args[0] if single else tuple(args)
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(pl_module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def map_tensors(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (through dicts, lists and tuples; other leaves as they are).

    Example:
        >>> map_tensors({"x": torch.ones(2), "n": 3}, lambda t: t * 2)
        {'x': tensor([2., 2.]), 'n': 3}
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if type(value) in (tuple, list):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def _detached(value: Any) -> Any:
    return map_tensors(value, torch.Tensor.detach)


def _cloned(value: Any) -> Any:
    return map_tensors(value, torch.Tensor.clone)


def _first_rows(value: Any) -> Any:
    """``value`` with every tensor that has a batch dimension cut to its first row."""
    return map_tensors(value, lambda t: t[:1] if t.dim() else t)


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def check_not_compiled(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Raise if the module (or a sub-module) is ``torch.compile``d: the graph would keep the old architecture.

    ``trainer.fit(torch.compile(module))`` is caught too: Lightning unwraps the compiled module and keeps the
    compiled ``forward``/``*_step`` on it (``pl_module._compiler_ctx``).
    """
    compiled = [n for n, m in pl_module.named_modules() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)]
    whole = getattr(pl_module, "_compiler_ctx", None) is not None or getattr(trainer.strategy, "_compiled", False)
    if compiled or whole:
        raise RuntimeError(
            f"{who} cannot mutate a torch.compile'd model ({compiled or 'the whole module'}): the compiled "
            "graph would silently keep the old architecture. Train without torch.compile, or compile only "
            "after growth/export has finished."
        )


# ---------------------------------------------------------------- ranks


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


# ---------------------------------------------------------------- apply


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
    """Update every optimizer and LR scheduler for ``change`` and rebuild DDP (also when only buffers changed)."""
    if not change.changes_parameter_set:
        if change.buffers_changed:
            rewrap_ddp(trainer, pl_module)
        return
    schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    for optimizer in trainer.optimizers:
        update_optimizer(optimizer, change, pl_module)
        sync_schedulers(schedulers, optimizer)
    rewrap_ddp(trainer, pl_module)


def lr_scale(trainer: pl.Trainer) -> float:
    """Current lr / initial lr of the first param group (the paper scales each growth step's budget by it)."""
    if not trainer.optimizers:
        return 1.0
    group = trainer.optimizers[0].param_groups[0]
    initial = group.get("initial_lr", group["lr"])
    return float(group["lr"]) / float(initial) if initial else 1.0


def is_last_training_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True on the epoch's last training batch: growth happens after its optimizer step, before validation and
    checkpointing, so a checkpoint saved at the epoch's end already holds the change (resume starts the next epoch)."""
    is_last = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
    return is_last or batch_idx + 1 >= trainer.num_training_batches


# ---------------------------------------------------------------- resume and load


def restore_architecture(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
    """Make a checkpoint's architecture log replay on the fresh module before Lightning loads its weights.

    Call from ``setup``. Lightning 2.6 only sets ``trainer.ckpt_path`` after ``setup``, right before it loads the
    weights, so a ``load_state_dict`` pre-hook replays the log at that moment (still before the optimizers are
    built). The events *and* the weights are tried on a copy first (:func:`~lightning_depthgrow.events.
    replay_checked`): a checkpoint that does not fit raises :class:`~lightning_depthgrow.EventLogMismatchError`
    with the module untouched. Call :func:`release_module` from ``teardown`` and ``on_exception``.
    """
    if trainer.ckpt_path:
        return _replay_checkpoint(trainer, pl_module, str(trainer.ckpt_path), None, True)
    previous = _RESTORE_HOOKS.pop(pl_module, None)
    if previous is not None:
        previous.remove()
    _RESTORE_HOOKS[pl_module] = pl_module.register_load_state_dict_pre_hook(_ReplayOnLoad(trainer, pl_module))
    return []


class _ReplayOnLoad:
    """The pre-hook: replay when the trainer restores the whole module from its checkpoint.

    It holds the trainer and module weakly, and a copy of it (``deepcopy``/``pickle`` of the module before
    teardown removed it) is inert, so it can never drag a Trainer along or replay into a copy.
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._module = weakref.ref(trainer), weakref.ref(pl_module)

    def __call__(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        trainer, pl_module = self._trainer(), self._module()
        if trainer is None or pl_module is None or prefix != "" or not trainer.ckpt_path:
            return
        if trainer.lightning_module is module:
            strict = args[1] if len(args) > 1 else True
            _replay_checkpoint(trainer, pl_module, str(trainer.ckpt_path), state_dict, bool(strict))

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _inert_hook, ()


def _inert_hook(*args: Any) -> Any:
    """What a copied :class:`_ReplayOnLoad` becomes: called as a factory, then as a hook; does nothing."""
    return None if args else _inert_hook


def _replay_checkpoint(
    trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, state_dict: Any, strict: bool
) -> list[Any]:
    checkpoint = read_checkpoint(path)
    events = pending_events(pl_module, checkpoint_events(checkpoint), path)
    if not events:
        return []
    weights = state_dict if state_dict is not None else checkpoint.get("state_dict")
    changes = replay_checked(pl_module, events, weights, strict=strict)
    rank_zero_info(f"lightning_depthgrow: replayed {len(events)} architecture event(s) from {path}")
    return changes


def release_module(pl_module: torch.nn.Module) -> None:
    """Remove what :func:`restore_architecture` and :func:`capture_inputs` registered on ``pl_module`` (call from
    ``teardown`` and ``on_exception``)."""
    handle = _RESTORE_HOOKS.pop(pl_module, None)
    if handle is not None:
        handle.remove()
    capture = _CAPTURES.pop(pl_module, None)
    if capture is not None:
        capture[0].remove()


def guard_spawn_results(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Call from ``teardown``: keep ``ddp_spawn`` from copying a changed architecture's weights into the parent.

    With ``ddp_spawn`` Lightning loads rank 0's final ``state_dict`` into the main process's module with
    ``strict=False``. That module never saw the workers' architecture events: sliced tensors would not fit,
    and grown blocks would be silently dropped, leaving a mixed model. Send nothing instead and say how to get
    the trained model (its checkpoint replays the event log). Only the worker processes' modules get the hook.
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    release_module(pl_module)
    launcher = getattr(trainer.strategy, "launcher", None)
    guarded = any(hook is _send_nothing for hook in pl_module._state_dict_hooks.values())
    if guarded or not isinstance(launcher, _MultiProcessingLauncher) or not event_log(pl_module):
        return
    pl_module.register_state_dict_post_hook(_send_nothing)
    rank_zero_warn(
        f"{who} changed the architecture inside ddp_spawn workers; the main process's module keeps its original "
        "architecture and weights. Load the trained model with lightning_depthgrow.load_grown(fresh_model, "
        "checkpoint_path), or use strategy='ddp', whose rank 0 is the main process."
    )


def _send_nothing(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.clear()


def check_no_dms_search(trainer: pl.Trainer, pl_module: pl.LightningModule, grower: Any) -> None:
    """Refuse growth while a DMS search has gates on the module (growth after the export is fine).

    DMS tracks its gates by position; a block or neuron added during the search would be sliced by the wrong
    mask at export. ``grower`` is the growth callback (its ``schedule`` says when it first grows).
    """
    from ..dms.appliers import ATTACH, EXPORT
    from .dms import DifferentiableModelScaling

    kinds = [e.kind for e in event_log(pl_module)]
    searching = ATTACH in kinds and EXPORT not in kinds
    dms = [cb for cb in trainer.callbacks if isinstance(cb, DifferentiableModelScaling)]
    first = grower.schedule.first_epoch() if grower.schedule is not None else 0
    name = type(grower).__name__
    if dms and EXPORT not in kinds and first is None:
        raise RuntimeError(
            f"{name} grows at fractions of training (at={list(grower.schedule.at)}), which may fall inside "
            f"DifferentiableModelScaling's search (epochs 0-{dms[0].search_epochs - 1}). DMS tracks its gates by "
            "position, so growth during the search would be sliced by the wrong masks. Grow by epoch after the "
            f"export (warmup_epochs >= {dms[0].search_epochs + 1} instead of at=...; for DepthGrowth with the operator "
            "named: DepthGrowth.paper(warmup_epochs=...) or DepthGrowth(operator='stack', warmup_epochs=...)), or grow "
            "in a separate fit."
        )
    if dms and EXPORT not in kinds and first < dms[0].search_epochs:
        raise RuntimeError(
            f"{name} would first grow at the end of epoch {first}, during DifferentiableModelScaling's search "
            f"(epochs 0-{dms[0].search_epochs - 1}, export at the start of epoch {dms[0].search_epochs}). DMS tracks "
            "its gates by position, so growth during the search would be sliced by the wrong masks. Grow after the "
            f"export: set warmup_epochs >= {dms[0].search_epochs + 1} (first growth at the end of epoch "
            f"{dms[0].search_epochs}), or grow in a separate fit."
        )
    if searching and not dms:
        raise RuntimeError(
            f"{name}: the module carries DMS search gates (a 'dms_attach' event without its 'dms_export'), e.g. from "
            "a checkpoint taken during a search. Growing a gated supernet would be sliced wrongly at export: finish "
            "the search with DifferentiableModelScaling in this Trainer (and grow after its export), or start from "
            "the exported model."
        )
