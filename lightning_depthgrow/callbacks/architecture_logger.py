"""Log how the architecture evolves (depth, widths, params, FLOPs, curvature, events) to every logger."""

from __future__ import annotations

import json
import os
import re
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
    flatten_event,
    write_events_csv,
)
from ..validation import check_bool, check_int
from . import _common, plumbing
from .curvature_monitor import CurvatureMonitor
from .depth_growth import DepthGrowth

_WHO = "ArchitectureLogger"
STEP_METRIC = "trainer/global_step"
EVENTS_FILENAME = "events.csv"
WIDTH_COLUMNS = ["step", "epoch", "block_id", "position", "width", "value", "at_birth", "kept_fraction"]
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# A validation metric's name: "val" or "validation" as a word of it (val_acc, val/loss, acc_val, validation_loss).
_VALIDATION_NAME = re.compile(r"(?:^|[/_.\-])val(?:idation)?(?:$|[/_.\-])", re.I)


class ArchitectureLogger(Callback):
    """Record the architecture as it trains and send it to W&B, TensorBoard, CSV or any Lightning logger.

    The logger only reads. At the first batch, at the end of every ``log_every_n_epochs``-th training epoch,
    at the first batch after any architecture event and at the end of training it takes a snapshot of the
    model (:func:`~lightning_depthgrow.history.describe_architecture`: depth per block stack, widths per
    block, parameters, FLOPs per sample), collects the events appended to the module's event log since the
    last poll (by ``DepthGrowth``, ``NeuronGrowth``, ``DifferentiableModelScaling`` or any callback using
    ``apply_and_sync``) and the new estimates of every
    :class:`~lightning_depthgrow.callbacks.CurvatureMonitor` (in ``trainer.callbacks`` or driven by a
    ``DepthGrowth``). It also records the training loss every ``trainer.log_every_n_steps`` steps (the mean
    of the losses ``training_step`` returned since the last point) and, after every validation, the logged
    validation metrics (``val`` or ``validation`` a word of the name: ``val_acc``, ``val/loss``), so the
    report can relate each change to training.

    Blocks are named by identity (``model.blocks#0``: block 0 of the starting model; ``model.blocks#e3``:
    the block event 3 of the log inserted; see :class:`~lightning_depthgrow.history.BlockIdentities`), in
    every logger and in the history. Everything is plotted against the global step.

    Everything goes into an :class:`~lightning_depthgrow.history.ArchitectureHistory`, written after every poll
    as ``architecture_history.json`` into ``trainer.log_dir`` (``default_root_dir`` without a logger), and:

    * W&B (:class:`~lightning.pytorch.loggers.WandbLogger`): metrics ``arch/depth/<stack>``,
      ``arch/depth/total``, ``arch/params``, ``arch/flops``, ``arch/curvature/<block id>``,
      ``arch/width/<block id>/<width>`` and ``arch/events_total`` (a step at every event: an event marker to
      overlay on any chart), all against ``trainer/global_step`` like Lightning's own metrics; the events as
      a ``wandb.Table`` ``arch/events`` with typed columns (``reason.score``, ``cost.params``, ...); the
      curvature heat map; at the end the report figures as images ``arch/figures/<name>`` (and with
      ``report=True`` the page itself as ``arch/report``), a widths table ``arch/widths``, the final
      architecture in ``run.summary["arch/final"]`` and a versioned artifact ``artifact_name`` (type
      ``"architecture"``, one version per run) with the history, the events CSV and the HTML report.
    * Any other logger: the same scalars through ``log_metrics(..., step=trainer.global_step)``;
      TensorBoard also gets the events as text (``arch/events``), the curvature heat map, widths and training
      figures as images and the final architecture as text; a CSV logger gets ``events.csv`` and the history
      JSON next to its ``metrics.csv``.

    Only global rank 0 measures and writes; other ranks do nothing (no collective calls, so no rank can
    wait on another). ``log_dir`` is resolved in ``setup``, which every rank runs.

    Args:
        log_every_n_epochs: poll at the end of every n-th training epoch (training end always polls).
        flops: count FLOPs per sample on ``pl_module.example_input_array`` or, if unset, on the input first found
            at the first training batch (:func:`~lightning_depthgrow.callbacks.plumbing.example_input`: the module's
            last forward call when a growth callback records them, else the first tensor of the batch), one row.
        wandb_table: log the events as a W&B table.
        heatmap: log the curvature heat map and the figures as images to W&B and TensorBoard (needs matplotlib).
        report: write the HTML report (:func:`~lightning_depthgrow.report.write_report`) into
            ``<log_dir>/architecture_report`` at the end of training (needs matplotlib).
        artifact_name: name of the W&B artifact; the same name in every run of a project makes each run a new
            version of it (``architecture:v0``, ``v1``, ...), aliased ``run-<run id>``.

    Example::

        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.loggers import WandbLogger
        >>> from lightning_depthgrow.callbacks import ArchitectureLogger, DepthGrowth
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
        artifact_name: str = "architecture",
    ) -> None:
        super().__init__()
        self.log_every_n_epochs = check_int("log_every_n_epochs", log_every_n_epochs, minimum=1)
        self.flops = check_bool("flops", flops)
        self.wandb_table = check_bool("wandb_table", wandb_table)
        self.heatmap = check_bool("heatmap", heatmap)
        self.report = check_bool("report", report)
        if not isinstance(artifact_name, str):
            raise TypeError(f"`artifact_name` must be a str, got {type(artifact_name).__name__}.")
        if not _ARTIFACT_NAME.match(artifact_name):
            raise ValueError(
                "`artifact_name` must be letters, digits, '-', '_' or '.' (a W&B artifact name), "
                f"got {artifact_name!r}."
            )
        self.artifact_name = artifact_name
        self.history = ArchitectureHistory()
        self.log_dir: str | None = None
        self._events_seen = 0
        self._curvature_seen: dict[str, int] = {}
        self._example_input: Any = None
        self._wandb_state: dict[int, _WandbState] = {}
        self._start_pending = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir broadcasts rank 0's directory: a collective every rank must join, hence here.
        self.log_dir = trainer.log_dir or trainer.default_root_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The starting architecture is recorded at the first batch, once a sample input for FLOPs exists.
        self._start_pending = True
        self.history.metadata.setdefault("model", type(pl_module).__name__)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self._example_input is None and self.flops:
            self._example_input = plumbing.example_input(pl_module, batch=batch, sample=True)
        if self._start_pending:
            self._start_pending = False
            self._poll(trainer, pl_module, "train_start", epoch=trainer.current_epoch)
        elif len(_common.event_log(pl_module)) != self._events_seen:
            # A change made since the last poll (at an epoch start, by a callback after this one at an epoch
            # end, or mid-epoch): record the new architecture at the step it took effect.
            self._poll(trainer, pl_module, "event", epoch=trainer.current_epoch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Summed on the device; read (a device sync) only once per logged point.
            value = loss.detach().float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._flush_loss(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for name, value in trainer.callback_metrics.items():
            if _VALIDATION_NAME.search(name) and isinstance(value, torch.Tensor) and value.numel() == 1:
                self.history.add_metric(name, trainer.global_step, float(value))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (trainer.current_epoch + 1) % self.log_every_n_epochs == 0:
            self._flush_loss(trainer)
            self._poll(trainer, pl_module, "epoch_end", epoch=trainer.current_epoch + 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._flush_loss(trainer)
        self._poll(trainer, pl_module, "train_end", epoch=trainer.current_epoch)
        report_html = None
        if self.report:
            from ..report import write_report

            report_html = write_report(self.history, os.path.join(self._log_dir(trainer), "architecture_report")).html
            rank_zero_info(f"{_WHO}: wrote {report_html}")
        figures = self._figures() if self.heatmap and trainer.loggers else {}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_final(logger, trainer, figures, report_html)
            elif isinstance(logger, TensorBoardLogger):
                final = self.history.final.to_dict()
                logger.experiment.add_text("arch/final", _code(json.dumps(final, indent=1)), trainer.global_step)
                for name, image in figures.items():
                    logger.experiment.add_image(f"arch/{name}", image, trainer.global_step, dataformats="HWC")

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

    def _flush_loss(self, trainer: pl.Trainer) -> None:
        if self._loss_sum is not None and self._loss_count:
            self.history.add_metric("train_loss", trainer.global_step, float(self._loss_sum) / self._loss_count)
        self._loss_sum, self._loss_count = None, 0

    def _poll(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str, epoch: int) -> None:
        """Snapshot, collect new events and curvature, write the files, send to loggers (rank 0 only)."""
        log = _common.event_log(pl_module)
        snapshot = self._snapshot(pl_module, phase, epoch, trainer.global_step)
        snapshot.num_events = len(log)
        last = self.history.final
        # Every epoch end is a row of the per-epoch series; start and end only when they add information.
        new_snapshot = (
            phase == "epoch_end" or last is None or not (last.same_architecture(snapshot) and last.epoch == epoch)
        )
        if new_snapshot:
            self.history.add_snapshot(snapshot)
        events = [self.history.add_event(e) for e in log[self._events_seen :]]
        self._events_seen = len(log)
        curvature = [self.history.add_curvature(entry) for entry in self._new_curvature_entries(trainer)]
        self.history.metadata.update(global_rank=trainer.global_rank, world_size=trainer.world_size)
        for path in self._history_paths(trainer):
            self.history.save(path)
        for directory in self._csv_dirs(trainer):
            write_events_csv(self.history.events, os.path.join(directory, EVENTS_FILENAME))
        if not (new_snapshot or events or curvature):
            return

        scalars = _scalars(self.history.snapshots[-1], curvature)
        heatmap = None
        if self.heatmap and any(r.valid for r in curvature):
            heatmap = self._figures(["curvature_heatmap"])["curvature_heatmap"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._wandb_log(logger, trainer, scalars, events, heatmap)
                continue
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                if events:
                    logger.experiment.add_text("arch/events", _markdown_table(events), trainer.global_step)
                if heatmap is not None:
                    logger.experiment.add_image(
                        "arch/curvature_heatmap", heatmap, trainer.global_step, dataformats="HWC"
                    )

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
        """Entries appended since the last poll to the ``history`` of every curvature monitor: those in
        ``trainer.callbacks`` and those a ``DepthGrowth`` drives privately (its ``curvature_monitor``)."""
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, CurvatureMonitor)]
        monitors += [cb.curvature_monitor for cb in trainer.callbacks if isinstance(cb, DepthGrowth)]
        entries = []
        for monitor in {id(m): m for m in monitors if isinstance(m, CurvatureMonitor)}.values():
            key = monitor.state_key
            new = monitor.history[self._curvature_seen.get(key, 0) :]
            self._curvature_seen[key] = len(monitor.history)
            entries.extend(e for e in new if "trace_per_param" in e)
        return entries

    def _figures(self, names: list[str] | None = None) -> dict[str, Any]:
        """Report figures as ``H x W x 3`` arrays (for W&B and TensorBoard images)."""
        from .. import report

        draw = {
            "training": report.training_figure,
            "widths": report.widths_figure,
            "curvature_heatmap": report.curvature_heatmap_figure,
            "params_flops": report.params_flops_figure,
        }
        names = [n for n in names or draw if report.has_data(self.history, n)]
        return {name: report.figure_to_array(draw[name](self.history)) for name in names}

    def _log_dir(self, trainer: pl.Trainer) -> str:
        # setup() resolved it on every rank; fall back for a logger attached outside Trainer.fit
        return self.log_dir or trainer.default_root_dir

    def _csv_dirs(self, trainer: pl.Trainer) -> list[str]:
        return list(dict.fromkeys(logger.log_dir for logger in trainer.loggers if isinstance(logger, CSVLogger)))

    def _history_paths(self, trainer: pl.Trainer) -> list[str]:
        dirs = [self._log_dir(trainer), *self._csv_dirs(trainer)]
        return list(dict.fromkeys(os.path.join(d, HISTORY_FILENAME) for d in dirs))

    # ------------------------------------------------------------------ W&B

    def _wandb(self, logger: WandbLogger) -> _WandbState:
        run = logger.experiment
        state = self._wandb_state.get(id(run))
        if state is None:
            state = self._wandb_state[id(run)] = _WandbState(run)
        return state

    def _wandb_log(
        self,
        logger: WandbLogger,
        trainer: pl.Trainer,
        scalars: dict[str, float],
        events: list[EventRow],
        heatmap: Any,
    ) -> None:
        import wandb

        state = self._wandb(logger)
        # Event markers: arch/events_total steps up at each event's own step (overlay it on any chart).
        first = len(self.history.events) - len(events)
        for k, event in enumerate(events):
            state.log({STEP_METRIC: event.step, "arch/events_total": first + k + 1})
        row: dict[str, Any] = {STEP_METRIC: trainer.global_step, **scalars}
        if events and self.wandb_table:
            row["arch/events"] = state.events_table(self.history.events)
        if heatmap is not None:
            row["arch/curvature_heatmap"] = wandb.Image(heatmap, caption="trace per parameter, block x step")
        state.log(row)

    def _wandb_final(
        self, logger: WandbLogger, trainer: pl.Trainer, figures: dict[str, Any], report_html: str | None
    ) -> None:
        import wandb

        state = self._wandb(logger)
        row: dict[str, Any] = {STEP_METRIC: trainer.global_step}
        row.update({f"arch/figures/{name}": wandb.Image(image, caption=name) for name, image in figures.items()})
        row["arch/widths"] = wandb.Table(columns=WIDTH_COLUMNS, data=_width_rows(self.history))
        if report_html is not None:
            with open(report_html, encoding="utf-8") as f:
                row["arch/report"] = wandb.Html(f.read(), inject=False)
        state.log(row)
        final = self.history.final.to_dict()
        state.run.summary["arch/final"] = final
        state.run.summary["arch/num_events"] = len(self.history.events)
        artifact = wandb.Artifact(
            self.artifact_name,
            type="architecture",
            description="Architecture history of a lightning-depthgrow run (one version per run)",
            metadata={"run_id": state.run.id, "num_events": len(self.history.events), **final},
        )
        artifact.add_file(self._history_paths(trainer)[0], name=HISTORY_FILENAME)
        with artifact.new_file("architecture.json") as f:
            json.dump(final, f, indent=1)
        with artifact.new_file(EVENTS_FILENAME) as f:
            f.write(_events_csv_text(self.history.events))
        if report_html is not None:
            artifact.add_file(report_html, name="architecture_report.html")
        state.run.log_artifact(artifact, aliases=["latest", f"run-{state.run.id}"])


class _WandbState:
    """Per W&B run: which ``arch/*`` keys already have ``trainer/global_step`` as step metric."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.defined: set[str] = set()
        run.define_metric(STEP_METRIC)
        run.define_metric("arch/*", step_metric=STEP_METRIC)

    def log(self, row: dict[str, Any]) -> None:
        # Declared per key too: an exact name outranks any glob another logger declared.
        for key in row:
            if key not in self.defined and key != STEP_METRIC:
                self.run.define_metric(key, step_metric=STEP_METRIC)
                self.defined.add(key)
        self.run.log(row)

    def events_table(self, events: list[EventRow]) -> Any:
        """Every event so far, one typed column per scalar of its reason and cost (the columns are the union
        over kinds, so the table is logged whole each time: W&B shows the latest version)."""
        import wandb

        rows = [flatten_event(e) for e in events]
        columns = list(dict.fromkeys(c for r in rows for c in r))
        return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)


def _width_rows(history: ArchitectureHistory) -> list[list[Any]]:
    """Rows of the ``arch/widths`` table: every width of every block at every snapshot, with its kept fraction."""
    rows, born = [], {}
    for snap in history.snapshots:
        for position, widths in snap.widths.items():
            block = snap.block_ids.get(position, position)
            for name, value in widths.items():
                start = born.setdefault((block, name), value)
                rows.append(
                    [snap.step, snap.epoch, block, position, name, value, start, value / start if start else None]
                )
    return rows


def _events_csv_text(events: list[EventRow]) -> str:
    import io

    buffer = io.StringIO()
    write_events_csv(events, buffer)
    return buffer.getvalue()


def _scalars(snapshot: ArchitectureSnapshot, curvature: list[CurvatureRecord]) -> dict[str, float]:
    scalars: dict[str, float] = {"arch/epoch": snapshot.epoch}
    scalars.update({f"arch/depth/{path}": n for path, n in snapshot.depth.items()})
    scalars["arch/depth/total"] = snapshot.total_depth
    scalars["arch/params"] = snapshot.params
    if snapshot.flops is not None:
        scalars["arch/flops"] = snapshot.flops
    for position, widths in snapshot.widths.items():
        block = snapshot.block_ids.get(position, position)
        scalars.update({f"arch/width/{block}/{name}": value for name, value in widths.items()})
    latest = next((r for r in reversed(curvature) if r.valid), None)
    if latest is not None:
        scalars.update({f"arch/curvature/{block}": v for block, v in latest.by_id().items()})
    return scalars


def _markdown_table(events: list[EventRow]) -> str:
    lines = ["| step | epoch | kind | block | what happened |", "|---|---|---|---|---|"]
    for e in events:
        cells = [e.step, e.epoch, e.kind, e.block_id or e.location, e.summary]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _code(text: str) -> str:
    # TensorBoard renders text as markdown: indent to show JSON verbatim
    return "\n".join("    " + line for line in text.splitlines())
