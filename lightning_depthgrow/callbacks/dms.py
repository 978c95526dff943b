"""Differentiable Model Scaling as a Lightning callback: search width and depth, then export.

A thin shell around :mod:`lightning_depthgrow.dms`: it decides when to attach the gates, how the
resource loss and the architecture parameters reach the user's training step and optimizer, how the
importances are synchronised across ranks, and when to export.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..dms import (
    ARCH_GROUP_KEY,
    ResourceModel,
    arch_group_options,
    attach_event,
    find_gates,
    fit_to_budget,
    update_importance,
)
from ..dms.appliers import ATTACH, EXPORT
from ..events import ArchitectureEvent
from ..surgery.optim import sync_schedulers
from ._common import (
    all_reduce_mean,
    apply_and_sync,
    broadcast,
    check_not_compiled,
    check_strategy_supported,
    event_log,
    guard_spawn_results,
    restore_architecture,
    save_event_log,
)

_WRAPPED = "_dms_wrapped_by"


class DifferentiableModelScaling(Callback):
    """Search a smaller architecture while training (DMS, Liu et al. 2024), then export it by slicing.

    During the first ``search_epochs`` epochs every gateable structure (MLP hidden units and heads of
    timm ViT blocks, inner channels of timm ResNet blocks, blocks with an identity skip in any stack of
    registered blocks) is multiplied by a differentiable top-k mask, and the loss gets
    ``lambda_res * max(0, log(r_c / r_t))`` with ``r_c`` the current FLOPs (or parameters) over the
    supernet's and ``r_t = target ** (t / T)``, ``T = schedule_fraction`` of the search steps; afterwards
    head and depth ratios are frozen and only widths are refined. At the start of epoch
    ``search_epochs`` the model is sliced to the hard masks and training continues on it, with the
    optimizer state sliced to match.

    The user's model, ``training_step`` and ``configure_optimizers`` stay as they are: the resource
    loss is added to the loss ``training_step`` returns (one backward, so AMP scaling and DDP gradient
    synchronisation apply to it unchanged), and the architecture ratios are moved into their own param
    group of the user's optimizer (no weight decay, no momentum, constant ``arch_lr``).

    Args:
        target: FLOPs (or parameters) to reach, as a fraction of the supernet's in ``(0, 1)`` or, if
            above 1, as an absolute count.
        search_epochs: epochs of search before export (at least 1).
        resource: ``"flops"`` or ``"params"``.
        lambda_res: weight of the resource loss.
        arch_lr: learning rate of the architecture ratios (constant; their group has no momentum, so the
            ratios stop when the hinge does; Adam steps each ratio by about ``arch_lr`` per step, so much
            larger values overshoot the target, see docs/dms.md).
        width, heads, depth: which kinds of gate to attach.
        schedule_fraction: part of the search over which the target decays (0.8 in the paper).
        example_input: input for the FLOPs count (default: the module's ``example_input_array``).
        enforce_target: at export, if the searched model is still above the target (the search hovers
            around it), drop the least important width elements until it is not
            (:func:`~lightning_depthgrow.dms.resource.fit_to_budget`); the event records how many.

    Example:
        >>> import lightning.pytorch as pl
        >>> dms = DifferentiableModelScaling(target=0.5, search_epochs=3)
        >>> trainer = pl.Trainer(max_epochs=6, callbacks=[dms])  # doctest: +SKIP
        >>> trainer.fit(Classifier(make_vit()), datamodule)  # doctest: +SKIP
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
    ) -> None:
        if not target > 0 or target == 1.0 or not math.isfinite(target):
            raise ValueError(
                f"target={target} is not a reduction: give a fraction of the supernet's {resource} in (0, 1) "
                "or an absolute count smaller than the supernet's."
            )
        if int(search_epochs) != search_epochs or search_epochs < 1:
            raise ValueError(f"search_epochs must be a positive integer, got {search_epochs}")
        if resource not in ("flops", "params"):
            raise ValueError(f"resource must be 'flops' or 'params', got {resource!r}")
        if lambda_res <= 0 or arch_lr <= 0:
            raise ValueError(f"lambda_res and arch_lr must be positive, got {lambda_res} and {arch_lr}")
        if not 0 < schedule_fraction <= 1:
            raise ValueError(f"schedule_fraction must be in (0, 1], got {schedule_fraction}")
        if not (width or heads or depth):
            raise ValueError("at least one of width, heads, depth must be True")
        self.target, self.search_epochs, self.resource = float(target), int(search_epochs), resource
        self.lambda_res, self.arch_lr, self.schedule_fraction = float(lambda_res), float(arch_lr), schedule_fraction
        self.width, self.heads, self.depth = width, heads, depth
        self.example_input, self.enforce_target = example_input, enforce_target
        self._trainer: pl.Trainer | None = None
        self._resources: ResourceModel | None = None
        self._target_ratio = 1.0
        self._schedule_steps = 1

    # ---------------------------------------------------------------- setup: attach, wrap, check target
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy_supported(trainer, "DifferentiableModelScaling")
        check_not_compiled(trainer, pl_module, "DifferentiableModelScaling")
        restore_architecture(trainer, pl_module)
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DifferentiableModelScaling adds its resource loss to the loss training_step returns, which "
                "needs automatic optimization; set automatic_optimization = True."
            )
        self._trainer = trainer
        kinds = [e.kind for e in event_log(pl_module)]
        if ATTACH not in kinds:
            event = attach_event(
                pl_module,
                self.arch_lr,
                self.width,
                self.heads,
                self.depth,
                epoch=trainer.current_epoch,
                step=trainer.global_step,
            )
            apply_and_sync(None, pl_module, event)
            rank_zero_info(
                f"DMS: attached {len(event.spec['gates'])} gates: "
                + ", ".join(f"{s['name']} ({s['n']})" for s in event.spec["gates"])
            )
        if EXPORT not in kinds and find_gates(pl_module) is not None:
            self._build_resources(pl_module)
        self._wrap(pl_module)

    def _build_resources(self, pl_module: pl.LightningModule) -> None:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(
                "DifferentiableModelScaling needs an example input to count FLOPs: set "
                "pl_module.example_input_array or pass example_input=..."
            )
        self._resources = res = ResourceModel.build(pl_module, example)
        full = res.full(self.resource)
        gates = find_gates(pl_module)
        floor = res.minimum(gates, self.resource)
        target = self.target if self.target < 1 else self.target / full
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
        self._target_ratio = target

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        """Route the resource loss and the architecture param group through the user's own hooks."""
        if pl_module.__dict__.get(_WRAPPED) is self:
            return
        pl_module.__dict__[_WRAPPED] = self
        user_step: Callable[..., Any] = pl_module.training_step
        user_configure: Callable[[], Any] = pl_module.configure_optimizers

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._add_resource_loss(pl_module, user_step(*args, **kwargs))

        def configure_optimizers() -> Any:
            config = user_configure()
            optimizers = _find_optimizers(config)
            self._install_arch_group(pl_module, optimizers)
            # torch schedulers built before the new group would fail on it (strict zip in torch >= 2.9)
            sync_schedulers(_find_schedulers(config), optimizers[0])
            return config

        pl_module.training_step = training_step
        pl_module.configure_optimizers = configure_optimizers

    def _install_arch_group(self, pl_module: pl.LightningModule, optimizers: list[torch.optim.Optimizer]) -> None:
        if len(optimizers) != 1:
            raise RuntimeError(
                f"DifferentiableModelScaling needs configure_optimizers to return exactly one optimizer "
                f"(found {len(optimizers)}) to hold the architecture parameters."
            )
        gates = find_gates(pl_module)
        arch = gates.arch_parameters() if gates is not None else []
        ids = {id(p) for p in arch}
        optimizer = optimizers[0]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        # Added even when empty (after export), so the groups line up with checkpoints taken during search.
        optimizer.add_param_group({"params": arch, **arch_group_options(self.arch_lr, optimizer.defaults)})

    # ---------------------------------------------------------------- search
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
        self._schedule_steps = max(1, int(self.schedule_fraction * self.search_epochs * per_epoch))

    def target_ratio_at(self, step: int) -> float:
        """``r_t = target ** (t / T)``, held at ``target`` after ``T`` steps."""
        return self._target_ratio ** min(1.0, step / self._schedule_steps)

    def _add_resource_loss(self, pl_module: pl.LightningModule, output: Any) -> Any:
        gates = find_gates(pl_module)
        if gates is None or self._resources is None or output is None:
            return output
        step = self._trainer.global_step if self._trainer is not None else 0
        r_t = self.target_ratio_at(step)
        r_c = self._resources.evaluate(gates, self.resource) / self._resources.full(self.resource)
        loss = self.lambda_res * torch.relu(torch.log(r_c / r_t))
        pl_module.log_dict(
            {"dms/resource_ratio": r_c.detach(), "dms/target_ratio": r_t, "dms/resource_loss": loss.detach()},
            on_step=True,
            on_epoch=False,
        )
        if isinstance(output, torch.Tensor):
            return output + loss.to(output.dtype)
        if isinstance(output, dict) and "loss" in output:
            return {**output, "loss": output["loss"] + loss.to(output["loss"].dtype)}
        raise TypeError(
            f"training_step returned {type(output).__name__}; DMS needs a loss tensor or a dict with 'loss'"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        gates = find_gates(pl_module)
        if gates is None or trainer.global_step < self._schedule_steps:
            return
        # Last part of the search: depth and heads are fixed, only widths move (frozen_ratio is a buffer,
        # so a resumed run stays frozen).
        for gate in gates.gate_list():
            if gate.kind != "width" and not gate.frozen:
                gate.freeze()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for group in optimizer.param_groups:
            if group.get(ARCH_GROUP_KEY):
                group["lr"] = self.arch_lr  # constant, whatever the user's scheduler did to all groups
        gates = find_gates(pl_module)
        if gates is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        # dL/dm is averaged over ranks like any gradient, so every rank holds identical importances.
        update_importance(gates.bank, reduce=lambda t: all_reduce_mean(trainer, t), scale=scale)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        gates = find_gates(pl_module)
        if gates is not None:
            gates.project_()

    # ---------------------------------------------------------------- export
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gates = find_gates(pl_module)
        if gates is None or trainer.current_epoch < self.search_epochs:
            return
        res, resource = self._resources, self.resource
        before = res.full(resource) if res else float("nan")
        searched = float(res.evaluate(gates, resource, hard=True)) if res else float("nan")
        trimmed = fit_to_budget(gates, res, self._target_ratio * before, resource) if res and self.enforce_target else 0
        after = float(res.evaluate(gates, resource, hard=True)) if res else float("nan")
        keep = broadcast(trainer, gates.keep())
        kept = {name: len(k) for name, k in keep.items()}
        event = ArchitectureEvent(
            EXPORT,
            {"keep": keep},
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            reason={
                "kept": kept,
                "n": {s["name"]: s["n"] for s in gates.specs},
                "target_ratio": self._target_ratio,
                "searched_ratio": searched / before,
                "trimmed_elements": trimmed,
            },
            cost={f"{resource}_before": before, f"{resource}_after": after},
        )
        apply_and_sync(trainer, pl_module, event)
        self._resources = None
        rank_zero_info(
            f"DMS: exported at epoch {trainer.current_epoch}: {resource} {after:.4g} / {before:.4g} "
            f"({after / before:.3f}); kept " + ", ".join(f"{k}={v}" for k, v in kept.items())
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_event_log(checkpoint, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            guard_spawn_results(trainer, pl_module, "DifferentiableModelScaling")


def _find_schedulers(config: Any) -> list[Any]:
    """Every LR scheduler in ``configure_optimizers``'s output, including those chained inside others."""
    if isinstance(config, dict):
        return [s for value in config.values() for s in _find_schedulers(value)]
    if isinstance(config, (list, tuple)):
        return [s for item in config for s in _find_schedulers(item)]
    if hasattr(config, "base_lrs") or hasattr(config, "_schedulers"):
        return [config, *(s for child in getattr(config, "_schedulers", []) for s in _find_schedulers(child))]
    return []


def _find_optimizers(config: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer in whatever ``configure_optimizers`` returned (optimizer, list, tuple, dict)."""
    if isinstance(config, torch.optim.Optimizer):
        return [config]
    if isinstance(config, dict):
        return _find_optimizers(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        found: list[torch.optim.Optimizer] = []
        for item in config:
            for opt in _find_optimizers(item):
                if all(opt is not f for f in found):
                    found.append(opt)
        return found
    return []
