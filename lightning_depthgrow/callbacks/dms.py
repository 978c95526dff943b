"""Differentiable Model Scaling as a Lightning callback: search width and depth, then export.

A thin shell around :mod:`lightning_depthgrow.dms` on the callback base
:class:`~lightning_depthgrow.callbacks.base.ArchitectureCallback`: the base owns preflight, resume replay, the
rank-0 broadcast and application of the export event, the checkpoint's event log and teardown; this callback says
when to attach the gates (:meth:`~DifferentiableModelScaling.on_setup_fit`), how the resource loss and the
architecture parameters reach the optimizer, how the importances are synchronised across ranks, what the export is
(:meth:`~DifferentiableModelScaling.propose`) and when (``change_at = "epoch_start"``, epoch ``search_epochs``). It
works only through Lightning's own hooks: the user's ``training_step`` and ``configure_optimizers`` are never
replaced.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle

from ..adapters.registry import UnsupportedModelError
from ..dms import (
    ARCH_GROUP_KEY,
    DMSGates,
    ResourceModel,
    arch_group_options,
    attach_event,
    check_tie,
    export_model,
    find_gates,
    fit_architecture,
    remove_gates,
    update_importance,
)
from ..dms.appliers import ATTACH, EXPORT
from ..dms.sites import is_embed_site
from ..events import CHECKPOINT_KEY, LOG_ATTRIBUTE, ArchitectureEvent, event_log
from ..validation import check_bool, check_choice, check_float, check_int
from .base import ArchitectureCallback
from .plumbing import all_reduce_mean, apply_and_sync, require_example_input

_WHO = "DifferentiableModelScaling"
_NO_STEP = 2**62  # "no non-finite loss yet" for the first bad step kept on the device (a minimum over steps)
# argument: attach spec key
_ATTACH_SETTINGS = {
    "arch_lr": "lr",
    "width": "width",
    "heads": "heads",
    "depth": "depth",
    "embed": "embed",
    "tie": "tie",
}
_PLUMBING = "_depthgrow"  # prefix of what the shared callback plumbing stores on the module's __dict__


class DifferentiableModelScaling(ArchitectureCallback):
    """Search a smaller architecture while training (DMS, Liu et al. 2024), then export it by slicing.

    During the first ``search_epochs`` epochs every gateable structure (MLP hidden units and heads of
    timm ViT blocks, inner channels of timm ResNet blocks, blocks with an identity skip in any stack of
    registered blocks) is multiplied by a differentiable top-k mask, and the loss gets
    ``lambda_res * max(0, log(r_c / r_t))`` with ``r_c`` the current FLOPs (or parameters) over the
    supernet's and ``r_t = target ** (t / T)``, ``T = schedule_fraction`` of the search steps; afterwards
    head and depth ratios are frozen and only widths are refined. At the start of epoch
    ``search_epochs`` the model is sliced to the hard masks and training continues on it, with the
    optimizer state sliced to match.

    It is an :class:`~lightning_depthgrow.callbacks.base.ArchitectureCallback`: the export is the one event its
    :meth:`propose` returns, at the start of epoch ``search_epochs`` (``change_at = "epoch_start"``: after the last
    search epoch's validation and checkpoints, so those hold the gated supernet they measured).

    The user's model, ``training_step`` and ``configure_optimizers`` stay as they are, and nothing is left
    on the module after ``fit`` but its architecture history: the resource loss enters through Lightning's
    ``on_before_backward`` hook (its gradient, which reaches only the architecture ratios, is added to theirs
    before the optimizer step, after AMP unscaling, so clipping applies to it), and ``on_fit_start`` moves the
    architecture ratios into their own param group of the user's optimizer (no weight decay, no momentum,
    constant ``arch_lr``), which every torch LR scheduler then also drives at that constant rate.

    Args:
        target: what to reach, as a fraction of the supernet's FLOPs (or parameters) in ``(0, 1)``; with
            ``absolute_target=True``, as a count (e.g. ``2.5e6`` FLOPs).
        search_epochs: epochs of search before export (at least 1, fewer than the Trainer's ``max_epochs``).
        resource: ``"flops"`` or ``"params"``.
        lambda_res: weight of the resource loss (> 0).
        arch_lr: learning rate of the architecture ratios (> 0; constant; their group has no momentum, so the
            ratios stop when the hinge does; Adam steps each ratio by about ``arch_lr`` per step, so much
            larger values overshoot the target, see docs/dms.md).
        width, heads, depth: which kinds of gate to attach.
        embed: also gate the embedding (residual-stream) width of a timm or torchvision ``VisionTransformer`` or a
            Hugging Face ``ViTForImageClassification``/``ViTModel`` (off by default; one width gate per model, its
            LayerNorms made mask-aware, see docs/dms.md). Variants it does not handle are refused at setup with a
            message.
        schedule_fraction: part of the search over which the target decays, in ``(0, 1]`` (0.8 in the paper).
        example_input: input for the FLOPs count (default: the module's ``example_input_array``).
        enforce_target: at export, choose depth and width jointly so the exported model lands within 5% of the
            target from either side (:func:`~lightning_depthgrow.dms.fit_architecture`: the searched depth first,
            the searched widths scaled together, heads only if widths cannot get there); a warning gives the
            achieved ratio when no architecture the gates allow can. The export event's ``reason`` records the
            searched and exported ratios, the deviation, how many elements and blocks changed. With ``False`` the
            searched hard masks are exported as they are.
        absolute_target: read ``target`` as a count of ``resource`` instead of a fraction. A ``target`` above 1
            without it is refused (``target=40`` meaning 40% is an easy slip).
        tie: kinds of gate (``"width"``, ``"heads"``) whose keep count is shared across blocks: the gates of that
            kind with the same site and size (every ViT block's MLP gate) share ONE learnable ratio, so the export
            has the same MLP width (or number of heads) in every block; each block still keeps its own most
            important units (its own importances). Off by default (``()``). A kind that is not searched, or of
            which the model has no two gates of equal size, is refused with a message (at construction or setup,
            before the module is touched). See docs/dms.md.

    Example:
        >>> import lightning.pytorch as pl
        >>> dms = DifferentiableModelScaling(target=0.5, search_epochs=3)
        >>> trainer = pl.Trainer(max_epochs=6, callbacks=[dms])  # doctest: +SKIP
        >>> trainer.fit(Classifier(make_vit()), datamodule)  # doctest: +SKIP
        >>> DifferentiableModelScaling(target=40, search_epochs=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `target` is a fraction of the supernet's flops in (0, 1), got 40. For 40% write target=0.4; ...
        >>> counted = DifferentiableModelScaling(target=2.5e6, absolute_target=True, search_epochs=3)
        >>> DifferentiableModelScaling(target=0.5, search_epochs=3, embed=True, depth=False, tie=("width",)).tie
        ('width',)
    """

    def __init__(
        self,
        target: float,
        search_epochs: int,
        resource: str = "flops",
        lambda_res: float = 1.0,
        arch_lr: float = 0.01,
        width: bool = True,
        heads: bool = True,
        depth: bool = True,
        schedule_fraction: float = 0.8,
        example_input: Any = None,
        enforce_target: bool = True,
        absolute_target: bool = False,
        embed: bool = False,
        tie: str | Iterable[str] | None = None,
    ) -> None:
        super().__init__(schedule=None)
        self.resource = check_choice("resource", resource, ("flops", "params"))
        self.absolute_target = check_bool("absolute_target", absolute_target)
        self.target = _check_target(target, self.absolute_target, self.resource)
        self.search_epochs = check_int("search_epochs", search_epochs, minimum=1)
        self.lambda_res = check_float("lambda_res", lambda_res, low=0.0)
        self.arch_lr = check_float("arch_lr", arch_lr, low=0.0)
        self.width = check_bool("width", width)
        self.heads = check_bool("heads", heads)
        self.depth = check_bool("depth", depth)
        self.embed = check_bool("embed", embed)
        if not (width or heads or depth or embed):
            raise ValueError(
                "`width`, `heads`, `depth` and `embed` are all False: at least one kind of gate must be searched."
            )
        self.tie = check_tie(tie if tie is None or isinstance(tie, str) else tuple(tie))
        off = [k for k in self.tie if not getattr(self, k)]
        if off:
            raise ValueError(
                f"tie={self.tie!r} ties gates of kind {off!r}, but {', '.join(f'{k}=False' for k in off)}: no such "
                f"gates are searched. Drop {off!r} from `tie` or set {', '.join(f'{k}=True' for k in off)}."
            )
        self.schedule_fraction = check_float("schedule_fraction", schedule_fraction, low=0.0, high=1.0)
        self.enforce_target = check_bool("enforce_target", enforce_target)
        self.example_input = example_input
        self._resources: ResourceModel | None = None
        self._target_ratio = 1.0
        self._schedule_steps = 1
        self._target_hook: RemovableHandle | None = None  # checks a resumed search's target (during setup..fit)
        self._checked = False
        self._keys_before: set[str] = set()
        self._resource_grad: torch.Tensor | None = None  # the resource loss's gradient of each ratio, this step
        self._first_bad_step: torch.Tensor | None = None  # first step with a non-finite loss (or _NO_STEP), on device
        self._arch_options: tuple[tuple, dict[str, Any]] | None = None  # ((optimizer id, device), arch group options)
        self._frozen_done = False  # depth and head ratios frozen for the width-only phase (checked once)
        self._planned: tuple[ArchitectureEvent, ResourceModel | None, float] | None = None  # prepare -> on_setup_fit
        self._example_value: Any = None

    #: The export runs at the start of epoch ``search_epochs``, after the last search epoch's validation/checkpoints.
    change_at: ClassVar[str] = "epoch_start"
    #: DMS checks its own gates (a second search, a resumed one) itself.
    refuse_during_dms_search: ClassVar[bool] = False

    # ---------------------------------------------------------------- setup: check everything, then attach
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._keys_before = set(pl_module.__dict__)
        super().setup(trainer, pl_module, stage)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what cannot be searched and plan the gates on a copy, before a checkpoint's log is replayed."""
        self._check_trainer(trainer, pl_module)
        self._example_value = self._example(pl_module)
        self._remove_target_hook()
        if trainer.ckpt_path:
            self._check_resumed_target(trainer)
        self._resource_grad, self._first_bad_step, self._frozen_done = None, None, False
        self._arch_options = None
        # Everything that can refuse (discovery, the FLOP count's forward through the gated model, the target
        # against what the gates can reach) runs before anything is put on the module: on a copy.
        self._planned = None
        if ATTACH not in _logged_kinds(pl_module):
            self._planned = self._plan(trainer, pl_module, self._example_value)
        else:
            self._resources, self._target_ratio = None, 1.0
        if not trainer.ckpt_path:
            # registered ahead of the base's replay hook, so the target is checked before anything is replayed
            self._check_target_when_weights_load(trainer, pl_module)

    def on_setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Attach the gates (after a resumed checkpoint's replay hook is in place), or measure those already on."""
        planned, example = self._planned, self._example_value
        self._planned, self._example_value = None, None
        try:
            kinds = _logged_kinds(pl_module)
            if ATTACH not in kinds and planned is not None:
                event, self._resources, self._target_ratio = planned
                self._attach(pl_module, event)
                if self._resources is None:  # not copyable: measured on the module itself (taken off on failure)
                    self._resources, self._target_ratio = self._measure(pl_module, find_gates(pl_module), example)
            elif EXPORT not in kinds and find_gates(pl_module) is not None:
                # the same module fit again before its search exported: it carries its gates already
                self._resources, self._target_ratio = self._measure(pl_module, find_gates(pl_module), example)
        except BaseException:
            self._detach(pl_module)
            raise

    def _check_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{_WHO} adds its resource loss through Lightning's automatic optimization (on_before_backward, "
                "on_before_optimizer_step); with automatic_optimization = False it would never act. Use automatic "
                "optimization for the search."
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and self.search_epochs >= max_epochs:
            raise ValueError(
                f"{_WHO} exports at the start of epoch search_epochs={self.search_epochs}, but the Trainer stops "
                f"after max_epochs={max_epochs}: the gated supernet would be returned unexported. Use max_epochs > "
                f"search_epochs (e.g. max_epochs={2 * self.search_epochs}, so the exported model trains on) or a "
                "smaller search_epochs."
            )

    def _example(self, pl_module: pl.LightningModule) -> Any:
        return require_example_input(pl_module, self.example_input, f"{_WHO} (to count {self.resource})")

    def _plan(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any
    ) -> tuple[ArchitectureEvent, ResourceModel | None, float]:
        """The ``dms_attach`` event, the resource model and the target ratio, worked out without touching the module.

        Discovery refuses unsupported models (Hugging Face transformers, ``Sequential`` roots, ...); the gates
        are then attached to a deep copy, whose FLOP count runs the gated forward once (a block the generic depth
        gate cannot scale is refused there) and whose reachable minimum is compared with the target. The resource
        model names gates, not modules, so it serves the real module once the same gates are attached to it.
        A module that cannot be deep-copied (it holds a lock, a file, ...) is measured after the gates are
        attached to it instead; a refusal there takes them off again (``None`` for the resource model).
        """
        event = attach_event(
            pl_module,
            self.arch_lr,
            self.width,
            self.heads,
            self.depth,
            embed=self.embed,
            tie=self.tie,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
        )
        # the trainer is shared, not copied (LightningModule drops it when pickled; hooks may still hold it)
        try:
            trial = copy.deepcopy(pl_module, {id(trainer): trainer})
        except Exception:
            return event, None, 1.0
        try:
            trial.__dict__.pop(LOG_ATTRIBUTE, None)
            apply_and_sync(None, trial, event)
            resources, target = self._measure(trial, find_gates(trial), example)
            if any(is_embed_site(s["site"]) for s in event.spec["gates"]):
                _check_embed_export(trial, example)
        finally:
            del trial
        return event, resources, target

    def _attach(self, pl_module: pl.LightningModule, event: ArchitectureEvent) -> None:
        apply_and_sync(None, pl_module, event)
        rank_zero_info(
            f"DMS: attached {len(event.spec['gates'])} gates: "
            + ", ".join(f"{s['name']} ({s['n']})" for s in event.spec["gates"])
        )

    def _measure(self, module: torch.nn.Module, gates: DMSGates, example: Any) -> tuple[ResourceModel, float]:
        """The resource model (FLOPs by FlopCounterMode) of the gated module and the target as a fraction."""
        res = ResourceModel.build(module, example)
        full = res.full(self.resource)
        floor = res.minimum(gates, self.resource)
        target = self.target / full if self.absolute_target else self.target
        if target >= 1:
            raise ValueError(
                f"target {self.target:g} {self.resource} is not smaller than the supernet's {full:g}; "
                "nothing to search for. Give a smaller target."
            )
        if target * full < floor:
            raise ValueError(
                f"target {target * full:g} {self.resource} is below the smallest model the gates can reach "
                f"({floor:g} = {floor / full:.3f} of the supernet); raise the target or gate more (depth=True)."
            )
        return res, target

    def _detach(self, pl_module: pl.LightningModule) -> None:
        """Take back what this fit put on the module, unless the search already exported (a failure before it)."""
        log = event_log(pl_module)
        if find_gates(pl_module) is not None and log and log[-1].kind == ATTACH:
            remove_gates(pl_module)
            log.pop()
        for key in [k for k in pl_module.__dict__ if k.startswith(_PLUMBING) and k not in self._keys_before]:
            value = pl_module.__dict__[key]
            if isinstance(value, list) and value:
                continue  # an event log that holds events (a resumed run's history)
            if isinstance(value, RemovableHandle):
                value.remove()
            del pl_module.__dict__[key]
        self._resources = None

    # ---------------------------------------------------------------- the architecture param group
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_optimizers, before Lightning loads a resumed checkpoint's optimizer and scheduler states
        # (which were saved with this group in place).
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"{_WHO} needs configure_optimizers to return exactly one optimizer (found "
                f"{len(trainer.optimizers)}) to hold the architecture parameters."
            )
        optimizer = trainer.optimizers[0]
        if any(g.get(ARCH_GROUP_KEY) for g in optimizer.param_groups):
            return
        gates = find_gates(pl_module)
        arch = gates.arch_parameters() if gates is not None else []
        ids = {id(p) for p in arch}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        # Added even when empty (after export), so the groups line up with checkpoints taken during search.
        options = self._arch_group_options(optimizer, arch[0].device if arch else None)
        optimizer.add_param_group({"params": arch, **options})
        _extend_schedulers([cfg.scheduler for cfg in trainer.lr_scheduler_configs], optimizer, self.arch_lr)

    # ---------------------------------------------------------------- search
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError(
                f"{_WHO} schedules its target over the search's steps, so it needs a train dataloader with a "
                "length (or Trainer(limit_train_batches=<int>))."
            )
        per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches))
        self._schedule_steps = max(1, int(self.schedule_fraction * self.search_epochs * per_epoch))
        searching = EXPORT not in [e.kind for e in event_log(pl_module)]
        if searching and trainer.max_steps >= 0 and trainer.max_steps <= self.search_epochs * per_epoch:
            raise ValueError(
                f"{_WHO} exports after search_epochs={self.search_epochs} epochs = {self.search_epochs * per_epoch} "
                f"optimizer steps, but the Trainer stops at max_steps={trainer.max_steps}: the gated supernet would "
                "be returned unexported. Raise max_steps or lower search_epochs."
            )

    def target_ratio_at(self, step: int) -> float:
        """``r_t = target ** (t / T)``, held at ``target`` after ``T`` steps."""
        return self._target_ratio ** min(1.0, step / self._schedule_steps)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        gates = find_gates(pl_module)
        if gates is None or self._resources is None:
            return
        self._note_finite(trainer, loss)
        # The resource loss depends on the architecture ratios only; its gradient is worked out here, from the soft
        # masks of this forward pass, and added to the ratios' gradients in on_before_optimizer_step. That equals
        # adding it to the loss training_step returned (divided by the accumulation, as Lightning divides that
        # loss), without touching training_step. The count is a sum of products of mask factors, so the gradient is
        # taken in closed form (count_and_mask_gradient, ratio_gradient): the same numbers as autograd through
        # the straight-through count, at a tenth of the cost of a second backward pass per step.
        r_t = self.target_ratio_at(trainer.global_step)
        full = self._resources.full(self.resource)
        with torch.no_grad():
            count, mask_grad = self._resources.count_and_mask_gradient(gates, self.resource)
            r_c = count / full
            over = r_c / r_t
            log_over = torch.log(over)
            res_loss = self.lambda_res * torch.relu(log_over)
            if any(p.requires_grad for p in gates.bank.ratios()):
                accumulate = max(1, trainer.accumulate_grad_batches)
                # d res_loss / d count, chained in autograd's order (relu, log, / r_t, / full)
                upstream = (log_over > 0) * (self.lambda_res / accumulate) / over / r_t / full
                grad = gates.bank.ratio_gradient(mask_grad * upstream)
                self._resource_grad = grad if self._resource_grad is None else self._resource_grad + grad
        if _logs_this_step(trainer):
            pl_module.log_dict(
                {"dms/resource_ratio": r_c, "dms/target_ratio": r_t, "dms/resource_loss": res_loss},
                on_step=True,
                on_epoch=False,
            )

    def _note_finite(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        """Remember the first step whose loss was not finite (on the device: no synchronisation per step)."""
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), _NO_STEP, dtype=torch.long, device=loss.device)
        finite = torch.isfinite(loss) if loss.dim() == 0 else torch.isfinite(loss).all()
        self._first_bad_step = torch.minimum(self._first_bad_step, torch.where(finite, _NO_STEP, trainer.global_step))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        gates = find_gates(pl_module)
        if gates is None or self._frozen_done or trainer.global_step < self._schedule_steps:
            return
        # Last part of the search: depth and heads are fixed, only widths move (frozen_ratio is a buffer,
        # so a resumed run stays frozen). Checked once per fit: reading a buffer's value is a device sync.
        for gate in gates.gate_list():
            if gate.kind != "width" and not gate.frozen:
                gate.freeze()
        self._frozen_done = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        gates = find_gates(pl_module)
        ratios = gates.bank.distinct_ratios()[0] if gates is not None else []
        options = self._arch_group_options(optimizer, ratios[0].device if ratios else None)
        for group in optimizer.param_groups:
            if group.get(ARCH_GROUP_KEY):
                # Constant lr, no momentum, no decay, whatever the user's scheduler did to all groups. The fused or
                # foreach choice stays as the group was made or loaded (a checkpoint's optimizer state matches it).
                group.update((k, v) for k, v in options.items() if k not in ("fused", "foreach"))
        if gates is None:
            return
        pending, self._resource_grad = self._resource_grad, None
        if pending is not None:
            pending = gates.bank.distinct_gradient(pending)  # tied gates: one ratio, the sum of their gradients
            # Gradients are unscaled here (AMP) and synchronised (DDP); the resource gradient is the same on every
            # rank, so adding it after the all-reduce is adding it to the mean.
            grads = [p.grad for p in ratios]
            if all(g is not None and g.dtype == pending.dtype for g in grads):
                torch._foreach_add_(grads, list(pending.unbind()))  # one op for all ratios (the usual case)
            else:
                for p, g in zip(ratios, pending.unbind()):
                    if p.grad is None:  # no task gradient reached it: the resource gradient alone
                        p.grad = g.to(p.dtype).clone()
                    else:
                        p.grad.add_(g.to(p.grad.dtype))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        # dL/dm is averaged over ranks like any gradient, so every rank holds identical importances.
        reduce = (lambda t: all_reduce_mean(trainer, t)) if trainer.world_size > 1 else None
        update_importance(gates.bank, reduce=reduce, scale=scale)

    def _arch_group_options(self, optimizer: torch.optim.Optimizer, device: torch.device | None) -> dict[str, Any]:
        """:func:`~lightning_depthgrow.dms.arch_group_options` for ``optimizer`` (worked out once per fit)."""
        key = (id(optimizer), device)
        if self._arch_options is None or self._arch_options[0] != key:
            self._arch_options = (key, arch_group_options(self.arch_lr, optimizer.defaults, device))
        return self._arch_options[1]

    def observe_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        gates = find_gates(pl_module)
        if gates is not None:
            gates.project_()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if find_gates(pl_module) is not None:
            self._check_not_diverged(trainer, pl_module)

    def _check_not_diverged(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to go on searching (or export) once the loss stopped being finite and took the weights with it."""
        bad_step = int(self._first_bad_step) if self._first_bad_step is not None else _NO_STEP
        bad_step = -1 if bad_step == _NO_STEP else bad_step
        bad_param = next((n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad_param is None:
            if bad_step >= 0:
                rank_zero_warn(
                    f"{_WHO}: the training loss was not finite at step {bad_step} (and maybe later); the weights "
                    "stayed finite (the step was skipped), so the search goes on."
                )
                self._first_bad_step = None
            return
        when = f" from step {bad_step} on" if bad_step >= 0 else ""
        raise RuntimeError(
            f"{_WHO}: the training loss is not finite{when} and the weights are no longer finite (e.g. "
            f"{bad_param}): the model diverged during the search, so it is not exported. Lower the learning rate, "
            "clip gradients (Trainer(gradient_clip_val=...)) or check the data and loss; then resume from a "
            "checkpoint saved before the divergence or start again."
        )

    # ---------------------------------------------------------------- export
    def is_due(self, trainer: pl.Trainer) -> bool:
        """At the start of epoch ``search_epochs`` (or later, for a search resumed past it) while gates are on."""
        return trainer.current_epoch >= self.search_epochs and find_gates(trainer.lightning_module) is not None

    def propose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ArchitectureEvent]:
        """The ``dms_export`` event: slice to the hard masks (fitted to the target with ``enforce_target``).

        Computed on every rank from identical (all-reduced) importances; the base applies rank 0's.
        """
        gates = find_gates(pl_module)
        if gates is None:  # is_due said otherwise; nothing to export
            return []
        self._check_not_diverged(trainer, pl_module)
        res, resource = self._resources, self.resource
        if res is None:  # cannot happen after setup; refuse rather than export an unmeasured model
            raise RuntimeError(f"{_WHO}: no resource model at export (setup did not run for this fit).")
        before = res.full(resource)
        budget = self._target_ratio * before
        searched = float(res.evaluate(gates, resource, hard=True))
        reason: dict[str, Any] = {"target_ratio": self._target_ratio, "searched_ratio": searched / before}
        if self.enforce_target:
            fit = fit_architecture(gates, res, budget, resource)
            if not fit.within:
                rank_zero_warn(
                    f"{_WHO}: the closest architecture the gates allow has {fit.value / before:.3f} of the "
                    f"supernet's {resource}, {fit.deviation:+.1%} off the target {self._target_ratio:.3f} (tolerance "
                    "5%): the ungated layers, or every gate at its limit, decide the count. Gate more of the model "
                    "or change the target."
                )
            reason.update(changed_elements=fit.changed, depth_changed=fit.depth_changed, within_tolerance=fit.within)
        after = float(res.evaluate(gates, resource, hard=True))
        keep = gates.keep()
        kept = {name: len(k) for name, k in keep.items()}
        reason.update(
            exported_ratio=after / before,
            deviation=after / budget - 1.0,
            kept=kept,
            n={s["name"]: s["n"] for s in gates.specs},
        )
        event = ArchitectureEvent(
            EXPORT,
            {"keep": keep},
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            reason=reason,
            cost={f"{resource}_before": before, f"{resource}_after": after},
        )
        return [event]

    def change_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any = None
    ) -> list[ArchitectureEvent]:
        events = super().change_now(trainer, pl_module, outputs)
        if events:
            self._resources = None  # the search is over
        return events

    def describe(self, event: ArchitectureEvent) -> str:
        resource, cost = self.resource, event.cost
        before, after = cost[f"{resource}_before"], cost[f"{resource}_after"]
        return f"exported: {resource} {after:.4g} / {before:.4g} ({after / before:.3f}); kept " + ", ".join(
            f"{k}={v}" for k, v in event.reason["kept"].items()
        )

    # ---------------------------------------------------------------- checkpoints, teardown
    def extra_state(self) -> dict[str, Any]:
        return {"target": self.target, "absolute_target": self.absolute_target, "resource": self.resource}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the search's state lives on the module (gates) and in the optimizer. The target is
        compared with the checkpoint's before its architecture is replayed (:meth:`_check_resumed_target`)."""

    def _check_resumed_target(self, trainer: pl.Trainer) -> None:
        """Refuse to resume a search with another target or resource, before anything of the checkpoint is applied.

        After the export the target no longer matters, so only search-phase checkpoints are compared.
        """
        checkpoint = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None)
        if not checkpoint:
            checkpoint = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False)
        events = checkpoint.get(CHECKPOINT_KEY, {}).get("events", [])
        attach = next((e for e in events if e.get("kind") == ATTACH), None)
        if attach is not None:
            # setup attaches the gates again before the log is replayed; the two must agree
            recorded = {name: attach["spec"].get(key) for name, key in _ATTACH_SETTINGS.items()}
            recorded["embed"] = bool(recorded["embed"])  # absent: a search without the embedding gate
            recorded["tie"] = tuple(recorded["tie"] or ())  # absent: a search without tied gates
            mine = {name: getattr(self, name) for name in _ATTACH_SETTINGS}
            if recorded != mine:
                raise ValueError(
                    f"The checkpoint {trainer.ckpt_path} holds a DMS search started with "
                    f"{', '.join(f'{k}={v!r}' for k, v in recorded.items())}; this run's callback has "
                    f"{', '.join(f'{k}={v!r}' for k, v in mine.items())}. Resume with the same settings."
                )
        saved_state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not saved_state or EXPORT in [e.get("kind") for e in events]:
            return
        saved = (saved_state.get("target"), saved_state.get("absolute_target", False), saved_state.get("resource"))
        if saved != (self.target, self.absolute_target, self.resource):
            raise ValueError(
                f"The checkpoint {trainer.ckpt_path} was saved during a DMS search for {_describe_target(*saved)}; "
                f"this run asks for {_describe_target(self.target, self.absolute_target, self.resource)}. A search "
                f"cannot change its target midway: resume with target={saved[0]!r}, absolute_target={saved[1]!r}, "
                f"resource={saved[2]!r}, or start a new search without ckpt_path."
            )

    def _check_target_when_weights_load(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning 2.6 learns the checkpoint path only after ``setup``, just before it loads the weights: check
        the target in a ``load_state_dict`` pre-hook registered ahead of the one that replays the architecture."""

        def hook(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
            if prefix == "" and trainer.ckpt_path and trainer.lightning_module is module and not self._checked:
                self._checked = True
                self._check_resumed_target(trainer)

        self._checked = False
        self._target_hook = pl_module.register_load_state_dict_pre_hook(hook)

    def _remove_target_hook(self) -> None:
        if self._target_hook is not None:
            self._target_hook.remove()
            self._target_hook = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if find_gates(pl_module) is not None:
            # What load_grown tells someone who loads this search-phase checkpoint into the bare network (e.g. the
            # best one by a validation metric): it holds the gated supernet, not an exported model.
            checkpoint[CHECKPOINT_KEY]["load_hint"] = (
                f"This checkpoint was saved during a DMS search (epoch {trainer.current_epoch}; the export happens at "
                f"epoch {self.search_epochs}): it holds the gated supernet, not an exported model. Load it into the "
                "LightningModule (load_grown(fresh_lightning_module, path)) and slice it to its current hard masks, "
                "which is what its validation measured, with lightning_depthgrow.dms.export_model(lightning_module); "
                f"or use a checkpoint saved after the export (epoch >= {self.search_epochs})."
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_target_hook()
        if trainer.state.fn == "fit":
            self._detach(pl_module)
        super().on_exception(trainer, pl_module, exception)
        self._resources, self._resource_grad = None, None
        self._planned, self._example_value = None, None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_target_hook()
        self._planned, self._example_value = None, None
        if stage != "fit":
            super().teardown(trainer, pl_module, stage)
            return
        self._resources, self._resource_grad, self._first_bad_step = None, None, None
        if find_gates(pl_module) is not None:
            rank_zero_warn(
                f"{_WHO}: training ended at epoch {trainer.current_epoch} before the export at epoch "
                f"{self.search_epochs} (stopped early?): the module is still the gated supernet. Slice it to its "
                "current hard masks with lightning_depthgrow.dms.export_model(module), or resume from the last "
                "checkpoint to finish the search."
            )
        super().teardown(trainer, pl_module, stage)  # releases the module, guards ddp_spawn results


def _check_embed_export(trial: torch.nn.Module, example: Any) -> None:
    """Refuse an embedding gate whose export would break the module around the gated model, before anything is
    attached to the user's module: on ``trial`` (a gated copy), the embedding gates keep one element less, the
    others all, the copy is exported, and it must still run on ``example`` with outputs of the same shapes.

    The embedding gate narrows the residual stream of the model it is on, and with it every output that is that
    stream (a ``ViTModel``'s ``last_hidden_state``, a ``VisionTransformer`` built with ``num_classes=0``): code of
    the LightningModule that reads it (a head on the class token) would fail, or silently broadcast, only after
    the export.
    """
    gates = find_gates(trial)
    keep = {
        s["name"]: list(range(s["n"] - 1 if is_embed_site(s["site"]) and s["n"] > 1 else s["n"])) for s in gates.specs
    }

    def shapes() -> list[tuple[int, ...]]:
        training = [(m, m.training) for m in trial.modules()]
        trial.eval()
        try:
            with torch.no_grad():
                if isinstance(example, dict):
                    out = trial(**example)
                else:
                    out = trial(*example) if isinstance(example, (tuple, list)) else trial(example)
        finally:
            for module, mode in training:
                module.training = mode
        return [tuple(t.shape) for t in _tensors(out)]

    before = shapes()
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a config's notes: about the trial, not the user's model
            export_model(trial, keep)
    except Exception as err:
        problem = f"its export fails ({type(err).__name__}: {err})"
    if problem is None:
        try:
            after = shapes()
            problem = None if after == before else f"its outputs change shape from {before} to {after}"
        except Exception as err:  # the narrowed model does not run on the example
            problem = f"it no longer runs on the example input ({type(err).__name__}: {err})"
    if problem is not None:
        raise UnsupportedModelError(
            f"{_WHO}: with embed=True the export narrows the embedding width, and the module with a narrower "
            f"embedding tried on a copy fails: {problem}. Code outside the gated model reads that width (e.g. a head "
            "on a ViTModel's last_hidden_state, or on a VisionTransformer built without its classification head). "
            "Gate the model that holds the head (ViTForImageClassification; a VisionTransformer with its head), or "
            "search with embed=False."
        )


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends this batch's step metrics to the loggers (``log_every_n_steps``, or the last step).

    Lightning keeps only the last value of a step-only metric and writes it every ``log_every_n_steps``
    batches, so logging on the other batches costs a ``self.log`` each (a third of the callback's per-step
    time) for values nobody sees. Asked during the batch, as Lightning's own ``on_train_batch_start`` check does.
    """
    connector = getattr(trainer, "_logger_connector", None)
    try:
        return bool(connector.should_update_logs) if connector is not None else True
    except Exception:  # another loop than fit's (cannot happen in training hooks): log as before
        return True


def _logged_kinds(module: torch.nn.Module) -> list[str]:
    """Kinds of the architecture events ``module`` carries (without creating its log)."""
    return [e.kind for e in module.__dict__.get(LOG_ATTRIBUTE) or []]


def _check_target(target: Any, absolute: bool, resource: str) -> float:
    """``target`` as a float: a fraction in (0, 1), or with ``absolute`` a count of at least 1."""
    number = isinstance(target, numbers.Real) and not isinstance(target, bool) and math.isfinite(target)
    if absolute:
        if number and target < 1:
            raise ValueError(
                f"With absolute_target=True, `target` is a count of {resource} (>= 1), got {target!r}. For a "
                "fraction of the supernet leave absolute_target=False."
            )
        return check_float("target", target, low=1.0, low_inclusive=True)
    if number and target > 1:
        raise ValueError(
            f"`target` is a fraction of the supernet's {resource} in (0, 1), got {target!r}. For {target:g}% write "
            f"target={target / 100:g}; for an absolute count of {resource} pass absolute_target=True."
        )
    return check_float("target", target, low=0.0, high=1.0, high_inclusive=False)


def _describe_target(target: Any, absolute: Any, resource: Any) -> str:
    if absolute:
        return f"target={target!r} {resource} (absolute_target=True)"
    return f"target={target!r} (a fraction of the supernet's {resource})"


def _constant_one(step: int) -> float:
    """lr factor of the architecture group in ``LambdaLR``/``MultiplicativeLR``: its lr stays ``arch_lr``."""
    return 1.0


def _walk(schedulers: Iterable[Any]) -> list[Any]:
    """Every scheduler, including those chained inside ``SequentialLR``/``ChainedScheduler``."""
    found: list[Any] = []
    for scheduler in schedulers:
        found.append(scheduler)
        found.extend(_walk(getattr(scheduler, "_schedulers", [])))
    return found


def _extend_schedulers(schedulers: Iterable[Any], optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give the LR schedulers of ``optimizer`` a constant entry for its last param group (just added).

    torch schedulers keep per-group values from construction (``base_lrs``, ``CyclicLR``'s ``max_lrs`` and
    momenta, ``ReduceLROnPlateau``'s ``min_lrs``, one ``lr_lambda`` per group) and ``OneCycleLR`` stores
    ``max_lr``/``min_lr``/momenta in each group; a group added later must have all of them or the scheduler
    fails (``KeyError: 'max_lr'``, strict zips). Each gets the value that keeps the group at ``lr`` and, where a
    scheduler cycles momentum, at zero momentum.
    """
    group = optimizer.param_groups[-1]
    n = len(optimizer.param_groups) - 1
    group["initial_lr"] = lr
    first = optimizer.param_groups[0] if n else {}
    for key, value in (("max_lr", lr), ("min_lr", lr), ("max_momentum", 0.0), ("base_momentum", 0.0)):
        if key in first:  # OneCycleLR's per-group keys
            group[key] = value
    per_group = {
        "base_lrs": lr,
        "_last_lr": lr,
        "max_lrs": lr,  # CyclicLR
        "base_momentums": 0.0,
        "max_momentums": 0.0,
        "min_lrs": 0.0,  # ReduceLROnPlateau
        "lr_lambdas": _constant_one,  # LambdaLR, MultiplicativeLR
    }
    for scheduler in _walk(schedulers):
        if getattr(scheduler, "optimizer", None) is not optimizer:
            continue
        for name, value in per_group.items():
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and len(values) == n:
                values.append(value)
