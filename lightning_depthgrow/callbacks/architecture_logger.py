"""Log how the architecture evolves (depth, widths, params, FLOPs, curvature, events) to every logger."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..history import (
    HISTORY_FILENAME,
    ArchitectureHistory,
    ArchitectureSnapshot,
    CurvatureRecord,
    EventRow,
    count_model_flops,
    describe_architecture,
)
from . import _common

_WHO = "ArchitectureLogger"
STEP_METRIC = "arch/epoch"
EVENT_COLUMNS = ["epoch", "step", "kind", "location", "reason", "cost"]


class ArchitectureLogger(Callback):
    """Record the architecture every epoch and send it to W&B, TensorBoard, CSV or any Lightning logger.

    The logger only reads: at the end of every ``log_every_n_epochs``-th training epoch and at the end of
    training it takes a snapshot of the model (:func:`~lightning_depthgrow.history.describe_architecture`:
    depth per block stack, widths per block, parameters, FLOPs per sample), collects the architecture events
    appended to the module's event log since the last poll (by ``DepthGrowth``, ``DifferentiableModelScaling``
    or any callback using ``apply_and_sync``) and the new estimates of any callback exposing a curvature
    ``history`` list (``CurvatureMonitor``). Events appended by callbacks that run after this one in the same
    hook are picked up at the next poll, with their own epoch and step.

    Everything goes into an :class:`~lightning_depthgrow.history.ArchitectureHistory`, written after every poll
    as ``architecture_history.json`` into ``trainer.log_dir`` (``default_root_dir`` without a logger), and:

    * W&B (:class:`~lightning.pytorch.loggers.WandbLogger`): metrics ``arch/depth/<stack>``,
      ``arch/depth/total``, ``arch/params``, ``arch/flops``, ``arch/curvature/<block>`` (trace per parameter),
      all against their own step metric ``arch/epoch`` (completed epochs; W&B would silently drop rows logged
      with a non-monotonic ``step``); the events as an incremental ``wandb.Table`` ``arch/events``; a
      curvature heatmap image ``arch/curvature_heatmap``; at the end, line charts ``arch/charts/*``, the final
      architecture in ``run.summary["arch/final"]`` and an artifact of type ``"architecture"`` holding the
      history JSON.
    * Any other logger: the same scalars through ``log_metrics(..., step=trainer.global_step)``;
      TensorBoard also gets the events as markdown text (``arch/events``) and the final architecture as
      JSON text (``arch/final``); a CSV logger gets the history JSON next to its ``metrics.csv``.

    Only global rank 0 measures and writes; other ranks do nothing (no collective calls, so no rank can
    wait on another). ``log_dir`` is resolved in ``setup``, which every rank runs.

    Args:
        log_every_n_epochs: poll at the end of every n-th training epoch (training end always polls).
        flops: count FLOPs per sample on ``pl_module.example_input_array`` or, if unset, the first tensor of
            the first training batch.
        wandb_table: log the events as a W&B table.
        heatmap: log the curvature heatmap image to W&B (needs matplotlib).
        report: write the HTML report (:func:`~lightning_depthgrow.report.write_report`) into
            ``<log_dir>/architecture_report`` at the end of training (needs matplotlib).

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import WandbLogger
        >>> from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
        >>> from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
        >>> trainer = pl.Trainer(  # doctest: +SKIP
        ...     max_epochs=6, logger=WandbLogger(project="grow"),
        ...     callbacks=[DepthGrowth(final_budget=2.0), ArchitectureLogger(report=True)])
        >>> trainer.fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        log_every_n_epochs: int = 1,
        flops: bool = True,
        wandb_table: bool = True,
        heatmap: bool = True,
        report: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(log_every_n_epochs, int) or isinstance(log_every_n_epochs, bool) or log_every_n_epochs < 1:
            raise ValueError(f"log_every_n_epochs must be an int >= 1, got {log_every_n_epochs!r}")
        for name, value in (("flops", flops), ("wandb_table", wandb_table), ("heatmap", heatmap), ("report", report)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.log_every_n_epochs = log_every_n_epochs
        self.flops = flops
        self.wandb_table = wandb_table
        self.heatmap = heatmap
        self.report = report
        self.history = ArchitectureHistory()
        self.log_dir: str | None = None
        self._events_seen = 0
        self._curvature_seen: dict[str, int] = {}
        self._example_input: Any = None
        self._wandb_state: dict[int, _WandbState] = {}
        self._start_pending = False

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir broadcasts rank 0's directory: a collective every rank must join, hence here.
        self.log_dir = trainer.log_dir or trainer.default_root_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The starting architecture is recorded at the first batch, once a sample input for FLOPs exists.
        self._start_pending = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self._example_input is None and self.flops:
            self._example_input = _example_input(pl_module, batch)
        if self._start_pending:
            self._start_pending = False
            self._poll(trainer, pl_module, "train_start", epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.current_epoch + 1) % self.log_every_n_epochs == 0:
            self._poll(trainer, pl_module, "epoch_end", epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._poll(trainer, pl_module, "train_end", epoch=trainer.current_epoch)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_final(logger, trainer)
            elif isinstance(logger, TensorBoardLogger):
                final = self.history.final.to_dict()
                logger.experiment.add_text("arch/final", _code(json.dumps(final, indent=1)), trainer.global_step)
        if self.report:
            from ..report import write_report

            files = write_report(self.history, os.path.join(self._log_dir(trainer), "architecture_report"))
            rank_zero_info(f"{_WHO}: wrote {files.html}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.to_dict(),
            "events_seen": self._events_seen,
            "curvature_seen": dict(self._curvature_seen),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = ArchitectureHistory.from_dict(state_dict["history"])
        self._events_seen = int(state_dict["events_seen"])
        self._curvature_seen = {k: int(v) for k, v in state_dict["curvature_seen"].items()}

    # ------------------------------------------------------------------ polling

    def _poll(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str, epoch: int) -> None:
        """Snapshot, collect new events and curvature, write the JSON, send to loggers (rank 0 only)."""
        snapshot = self._snapshot(pl_module, phase, epoch, trainer.global_step)
        last = self.history.final
        # Every epoch end is a row of the per-epoch series; start and end only when they add information.
        new_snapshot = (
            phase == "epoch_end" or last is None or not (last.same_architecture(snapshot) and last.epoch == epoch)
        )
        if new_snapshot:
            self.history.add_snapshot(snapshot)
        log = _common.event_log(pl_module)
        events = [self.history.add_event(e) for e in log[self._events_seen :]]
        self._events_seen = len(log)
        curvature = [self.history.add_curvature(entry) for entry in self._new_curvature_entries(trainer)]
        self.history.metadata.update(global_rank=trainer.global_rank, world_size=trainer.world_size)
        for path in self._history_paths(trainer):
            self.history.save(path)
        if not (new_snapshot or events or curvature):
            return

        scalars = _scalars(snapshot, curvature)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_log(logger, scalars, events, curvature)
                continue
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and events:
                logger.experiment.add_text("arch/events", _markdown_table(events), trainer.global_step)

    def _snapshot(self, pl_module: pl.LightningModule, phase: str, epoch: int, step: int) -> ArchitectureSnapshot:
        snapshot = describe_architecture(pl_module, epoch=epoch, step=step, phase=phase)
        example = pl_module.example_input_array
        if example is None:
            example = self._example_input
        if self.flops and example is not None:
            if isinstance(example, torch.Tensor):
                example = example.to(pl_module.device)
            try:
                snapshot.flops = count_model_flops(pl_module, example)
            except Exception as err:  # a logger must not end training: report once, then stop counting
                rank_zero_warn(
                    f"{_WHO}: could not count FLOPs of {type(pl_module).__name__} on its example input "
                    f"({type(err).__name__}: {err}); logging continues without FLOPs. Set "
                    "pl_module.example_input_array to an input its forward accepts, or pass flops=False."
                )
                self.flops = False
        return snapshot

    def _new_curvature_entries(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """Entries appended since the last poll to the ``history`` list of any curvature-monitoring callback."""
        entries = []
        # Monitors in trainer.callbacks, and private ones a callback drives itself (``DepthGrowth(monitor=...)``).
        sources = [cb for cb in trainer.callbacks if cb is not self]
        sources += [cb.curvature_monitor for cb in sources if getattr(cb, "curvature_monitor", None) is not None]
        for callback in {id(cb): cb for cb in sources}.values():
            history = getattr(callback, "history", None)
            if not isinstance(history, list):
                continue
            key = callback.state_key
            new = history[self._curvature_seen.get(key, 0) :]
            self._curvature_seen[key] = len(history)
            entries.extend(e for e in new if isinstance(e, dict) and "trace_per_param" in e)
        return entries

    def _log_dir(self, trainer: pl.Trainer) -> str:
        # setup() resolved it on every rank; fall back for a logger attached outside Trainer.fit
        return self.log_dir or trainer.default_root_dir

    def _history_paths(self, trainer: pl.Trainer) -> list[str]:
        dirs = [self._log_dir(trainer)]
        dirs += [logger.log_dir for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        return list(dict.fromkeys(os.path.join(d, HISTORY_FILENAME) for d in dirs))

    # ------------------------------------------------------------------ W&B

    def _wandb(self, logger: WandbLogger) -> _WandbState:
        run = logger.experiment
        state = self._wandb_state.get(id(run))
        if state is None:
            state = self._wandb_state[id(run)] = _WandbState(run)
        return state

    def _wandb_log(
        self, logger: WandbLogger, scalars: dict[str, float], events: list[EventRow], curvature: list[CurvatureRecord]
    ) -> None:
        import wandb

        state = self._wandb(logger)
        row: dict[str, Any] = dict(scalars)
        if events and self.wandb_table:
            row["arch/events"] = state.events_table(events)
        if self.heatmap and any(r.valid for r in curvature):
            from ..report import curvature_heatmap_figure, figure_to_array

            figure = curvature_heatmap_figure(self.history)
            row["arch/curvature_heatmap"] = wandb.Image(figure_to_array(figure), caption="trace per parameter")
        state.log(row)

    def _wandb_final(self, logger: WandbLogger, trainer: pl.Trainer) -> None:
        import wandb

        state = self._wandb(logger)
        snaps = self.history.snapshots
        xs = [s.epoch for s in snaps]
        charts = {
            "arch/charts/depth": wandb.plot.line_series(
                xs=xs,
                ys=[[s.depth.get(p, 0) for s in snaps] for p in self.history.stacks()],
                keys=self.history.stacks(),
                title="Depth per block stack",
                xname="completed epochs",
            ),
            "arch/charts/params": wandb.plot.line_series(
                xs=xs, ys=[[s.params for s in snaps]], keys=["params"], title="Parameters", xname="completed epochs"
            ),
        }
        flops = [s for s in snaps if s.flops is not None]
        if flops:
            charts["arch/charts/flops"] = wandb.plot.line_series(
                xs=[s.epoch for s in flops],
                ys=[[s.flops for s in flops]],
                keys=["flops"],
                title="FLOPs per sample",
                xname="completed epochs",
            )
        state.run.log(charts)  # whole-run charts, not a series over arch/epoch
        final = self.history.final.to_dict()
        state.run.summary["arch/final"] = final
        state.run.summary["arch/num_events"] = len(self.history.events)
        artifact = wandb.Artifact(f"architecture-{state.run.id}", type="architecture", metadata=final)
        artifact.add_file(self._history_paths(trainer)[0], name=HISTORY_FILENAME)
        with artifact.new_file("architecture.json") as f:
            json.dump(final, f, indent=1)
        state.run.log_artifact(artifact)


class _WandbState:
    """Per W&B run: which ``arch/*`` keys already have ``arch/epoch`` as step metric, and the events table."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.defined: set[str] = set()
        self.table: Any = None
        self.incremental = True
        self.rows: list[list[Any]] = []
        run.define_metric(STEP_METRIC)
        run.define_metric("arch/*", step_metric=STEP_METRIC)

    def log(self, row: dict[str, Any]) -> None:
        # Declared per key too: an exact name outranks WandbLogger's own "*" -> trainer/global_step glob.
        for key in row:
            if key not in self.defined and key != STEP_METRIC:
                self.run.define_metric(key, step_metric=STEP_METRIC)
                self.defined.add(key)
        self.run.log(row)

    def events_table(self, events: list[EventRow]) -> Any:
        """The events table to log: the same INCREMENTAL table with the new rows, else all rows anew."""
        import wandb

        new_rows = [
            [e.epoch, e.step, e.kind, e.location, json.dumps(e.reason, default=str), json.dumps(e.cost, default=str)]
            for e in events
        ]
        if self.table is None and self.incremental:
            try:
                self.table = wandb.Table(columns=EVENT_COLUMNS, log_mode="INCREMENTAL")
            except (TypeError, AssertionError):  # wandb < 0.21 has no incremental tables
                self.incremental = False
        if self.incremental:
            for row in new_rows:
                self.table.add_data(*row)
            return self.table
        self.rows.extend(new_rows)
        return wandb.Table(columns=EVENT_COLUMNS, data=list(self.rows))


def _example_input(pl_module: pl.LightningModule, batch: Any) -> Any:
    """A sample input: the first tensor of the batch, cut to one row (only when the module sets none)."""
    if pl_module.example_input_array is not None:
        return None
    tensor = _first_tensor(batch)
    return None if tensor is None else tensor[:1].detach().clone()


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _scalars(snapshot: ArchitectureSnapshot, curvature: list[CurvatureRecord]) -> dict[str, float]:
    scalars: dict[str, float] = {STEP_METRIC: snapshot.epoch}
    scalars.update({f"arch/depth/{path}": n for path, n in snapshot.depth.items()})
    scalars["arch/depth/total"] = snapshot.total_depth
    scalars["arch/params"] = snapshot.params
    if snapshot.flops is not None:
        scalars["arch/flops"] = snapshot.flops
    latest = next((r for r in reversed(curvature) if r.valid), None)
    if latest is not None:
        scalars.update({f"arch/curvature/{block}": v for block, v in latest.trace_per_param.items()})
    return scalars


def _markdown_table(events: list[EventRow]) -> str:
    lines = ["| epoch | step | kind | location | reason | cost |", "|---|---|---|---|---|---|"]
    for e in events:
        cells = [e.epoch, e.step, e.kind, e.location, json.dumps(e.reason, default=str), json.dumps(e.cost)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _code(text: str) -> str:
    # TensorBoard renders text as markdown: indent to show JSON verbatim
    return "\n".join("    " + line for line in text.splitlines())
