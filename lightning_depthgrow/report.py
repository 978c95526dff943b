"""A self-contained HTML report of what happened to a model while it trained, and what it bought.

Reads an :class:`~lightning_depthgrow.history.ArchitectureHistory` (``architecture_history.json``) and
writes one HTML page whose first screen answers "what happened to my model and what did it buy": a headline
(depth, parameters, FLOPs and the final metrics, start -> end), the training loss and validation metrics
with every architecture event marked, depth per block stack, parameters and FLOPs, widths per block (the
kept fraction, which shows what Differentiable Model Scaling cut) and the curvature heat map; below it one
line per event with its full record folded away.

**One time axis.** Every figure plots against the trainer's global step (optimizer steps so far), the
``step`` every history row carries; epochs only appear in the event list.

The figures are drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, so a user's global
matplotlib state is untouched and no display is needed) and embedded in the page as inline SVG: the page
makes no network request and works offline, mailed or attached as is. Each figure is also written as a PNG
next to the page (what W&B and TensorBoard receive).

Command line::

    python -m lightning_depthgrow report lightning_logs/version_0 --out report/
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .history import ArchitectureHistory, ArchitectureSnapshot, format_count

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_NAMES = ("training", "depth", "params_flops", "widths", "curvature_heatmap")
STEP_LABEL = "global step"

_EVENT_COLOUR = "#d62728"
_MISSING_COLOUR = "#e6e6e6"


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    html: str
    figures: dict[str, str]


# ---------------------------------------------------------------------------------------------- helpers


def _new_figure(width: float = 6.4, height: float = 3.2) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "The architecture report needs matplotlib: pip install 'lightning-depthgrow[report]'"
        ) from err
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _count_axis(axis: Any) -> None:
    """Tick labels in readable units (300k, 1.2M) instead of raw numbers or an offset."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: format_count(value)))


def _mark_events(ax: Axes, history: ArchitectureHistory, label: bool = False) -> None:
    """A dashed vertical line at the step of every event; with ``label``, its block written above the axes."""
    single_stack = len(history.stacks()) == 1
    for event in history.events:
        ax.axvline(event.step, color=_EVENT_COLOUR, ls="--", lw=0.9, alpha=0.7, zorder=1)
        if label:
            where = event.block_id or event.location
            if single_stack and "#" in where:
                where = where[where.index("#") :]
            ax.annotate(
                _short_event(event.kind, where),
                (event.step, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6.5,
                color=_EVENT_COLOUR,
            )


def _short_event(kind: str, where: str) -> str:
    names = {"insert_block": "+", "dms_export": "DMS export ", "dms_attach": "DMS ", "neuron_branch": "split "}
    return f"{names.get(kind, kind + ' ')}{where}".strip()


def _step_series(snapshots: list[ArchitectureSnapshot], values: list[float]) -> tuple[list[int], list[float]]:
    """One point per distinct step (the last observation of a step wins), for step plots."""
    points: dict[int, float] = {}
    for snap, value in zip(snapshots, values):
        points[snap.step] = value
    return list(points), list(points.values())


def _legend_event_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=_EVENT_COLOUR, ls="--", lw=0.9, label="architecture event")


# ---------------------------------------------------------------------------------------------- figures


def training_figure(history: ArchitectureHistory) -> Figure:
    """Training loss (and any validation loss) above, other validation metrics below, against the global
    step, with every architecture event marked as a dashed line labelled with its block."""
    ordered = sorted(history.metrics.items(), key=lambda item: not item[0].startswith("train"))
    losses = {k: v for k, v in ordered if "loss" in k.lower() and v}
    others = {k: v for k, v in ordered if "loss" not in k.lower() and v}
    figure = _new_figure(6.4, 3.6 if others else 3.0)
    axes = figure.subplots(2 if others else 1, 1, sharex=True, squeeze=False)[:, 0]
    if not losses and not others:
        _message(axes[0], "no training metrics recorded")
        _mark_events(axes[0], history, label=True)
        return figure
    for ax, series, ylabel in ((axes[0], losses, "loss"), (axes[-1], others, "validation metric")):
        for i, (name, points) in enumerate(series.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, color=f"C{i}", marker="o" if len(points) < 30 else None, ms=3, label=name)
        ax.set_ylabel(ylabel if series else "")
        _mark_events(ax, history, label=ax is axes[0])
        handles, _ = ax.get_legend_handles_labels()
        if ax is axes[0] and history.events:
            handles.append(_legend_event_handle())
        if handles:
            ax.legend(handles=handles, fontsize="x-small", loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(STEP_LABEL)
    figure.suptitle("Training, with architecture events", fontsize=12)
    return figure


def depth_figure(history: ArchitectureHistory) -> Figure:
    """Blocks per stack against the global step, as steps; several stacks are stacked as bands under their
    total (lines of equal depth would hide each other)."""
    import numpy as np

    figure = _new_figure(6.4, 2.6)
    ax = figure.add_subplot()
    stacks = history.stacks()
    if not history.snapshots or not stacks:
        _message(ax, "no block stacks recorded")
        return figure
    snaps = history.snapshots
    if len(stacks) == 1:
        ax.step(*_step_series(snaps, [s.depth.get(stacks[0], 0) for s in snaps]), where="post", marker="o", ms=3,
                color="C0", label=stacks[0])  # fmt: skip
    else:
        steps, _ = _step_series(snaps, [0] * len(snaps))
        below = np.zeros(len(steps))
        for i, path in enumerate(stacks):
            _, depth = _step_series(snaps, [s.depth.get(path, 0) for s in snaps])
            ax.fill_between(steps, below, below + depth, step="post", color=f"C{i}", alpha=0.6, lw=0, label=path)
            below = below + depth
        ax.step(steps, below, where="post", color="k", marker="o", ms=3, label="total")
        ax.set_ylim(0, max(below) * 1.15)
    _mark_events(ax, history)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("blocks" if len(stacks) == 1 else "blocks (stacked)")
    ax.set_title("Depth per block stack")
    ax.yaxis.get_major_locator().set_params(integer=True)
    handles, _ = ax.get_legend_handles_labels()
    handles = handles[::-1] + ([_legend_event_handle()] if history.events else [])
    if len(stacks) == 1:
        ax.legend(handles=handles, fontsize="x-small", loc="best")
    else:  # beside the plot: inside, it would cover the bands
        ax.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return figure


def params_flops_figure(history: ArchitectureHistory) -> Figure:
    """Parameters (top) and FLOPs per sample (bottom) against the global step, in readable units."""
    flops = [s for s in history.snapshots if s.flops is not None]
    figure = _new_figure(6.4, 3.4 if flops else 2.4)
    axes = figure.subplots(2 if flops else 1, 1, sharex=True, squeeze=False)[:, 0]
    if not history.snapshots:
        _message(axes[0], "no snapshots recorded")
        return figure
    snaps = history.snapshots
    axes[0].step(*_step_series(snaps, [s.params for s in snaps]), where="post", marker="o", ms=3, color="C0",
                 label="parameters")  # fmt: skip
    if flops:
        axes[1].step(*_step_series(flops, [s.flops for s in flops]), where="post", marker="s", ms=3, color="C1",
                     label="FLOPs per sample")  # fmt: skip
    for ax in axes:
        _count_axis(ax.yaxis)
        _mark_events(ax, history)
        ax.legend(fontsize="x-small", loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_title("Parameters and FLOPs")
    axes[-1].set_xlabel(STEP_LABEL)
    return figure


def widths_figure(history: ArchitectureHistory) -> Figure:
    """Kept fraction of every width of every block (rows) at every snapshot where widths changed (columns).

    A cell's colour is the width divided by that block's width when first seen (1 = untouched, 0.16 = DMS
    kept 10 of 64 MLP units); its text is the width itself. Grey cells: the block was not in the model then.
    """
    import numpy as np

    keys, snaps, table = history.width_matrix()
    figure = _new_figure(6.4, max(2.2, 0.22 * len(keys) + 1.4))
    ax = figure.add_subplot()
    if not keys:
        _message(ax, "no widths recorded (no attention heads, MLP fc1 or convolutions in the block stacks)")
        return figure
    values = np.asarray(table, dtype=float)
    # One column per distinct set of widths: consecutive identical snapshots add nothing to read.
    columns = [j for j in range(len(snaps)) if j == 0 or not _same_column(values[:, j], values[:, j - 1])]
    values = values[:, columns]
    born = np.array([row[np.isfinite(row)][0] if np.isfinite(row).any() else np.nan for row in np.asarray(table)])
    fraction = np.ma.masked_invalid(values / born[:, None])
    cmap = _colormap("viridis")
    image = ax.imshow(fraction, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0.0,
                      vmax=max(1.0, float(fraction.max()) if fraction.count() else 1.0))  # fmt: skip
    if values.size <= 400:
        for (i, j), value in np.ndenumerate(values):
            if math.isfinite(value):
                dark = fraction[i, j] < 0.6 * image.norm.vmax
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=6, color="w" if dark else "k")
    ax.set_yticks(range(len(keys)), [f"{block} {_width_label(name)}" for block, name in keys], fontsize=7)
    _step_ticks(ax, [snaps[j].step for j in columns])
    ax.set_xlabel(f"{STEP_LABEL} of the snapshot (only where a width changed){_grey_note(fraction)}", fontsize=8)
    ax.set_title("Widths per block (colour: kept fraction of the width at birth)")
    figure.colorbar(image, ax=ax, label="kept fraction", fraction=0.05, pad=0.02)
    return figure


def _same_column(a: np.ndarray, b: np.ndarray) -> bool:
    import numpy as np

    return bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)]))


def _width_label(name: str) -> str:
    """``"mlp.fc1.out_features"`` -> ``"mlp"``, ``"attn.num_heads"`` -> ``"heads"``, ``"conv1.out_channels"`` ->
    ``"conv1"``."""
    if name.endswith("num_heads"):
        return "heads"
    stem = name.rsplit(".", 1)[0]
    return stem[: -len(".fc1")] if stem.endswith(".fc1") else stem


def _grey_note(values: Any) -> str:
    """Explains grey cells, when there are any."""
    import numpy as np

    return "\ngrey: block not in the model then" if np.ma.count_masked(values) else ""


def _step_labels(steps: list[int]) -> list[str]:
    """Column labels: the step, with a letter where several columns share one (``[8, 8, 16]`` -> ``8a 8b 16``)."""
    labels = []
    for j, step in enumerate(steps):
        same = [k for k, s in enumerate(steps) if s == step]
        labels.append(str(step) if len(same) == 1 else f"{step}{chr(ord('a') + same.index(j))}")
    return labels


def _step_ticks(ax: Axes, steps: list[int] | list[str], most: int = 16) -> None:
    """One column per entry labelled by its step; every n-th label only when there are many."""
    every = max(1, math.ceil(len(steps) / most))
    ax.set_xticks(range(len(steps)), [str(s) if j % every == 0 else "" for j, s in enumerate(steps)], fontsize=7)
    if len(steps) > 8:
        ax.tick_params(axis="x", labelrotation=90)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=_MISSING_COLOUR)


def curvature_heatmap_figure(history: ArchitectureHistory) -> Figure:
    """Hessian trace per parameter of every block identity (rows) at every valid estimate (columns, labelled by
    the step it was taken at), on a diverging colour scale symmetric around 0 (Hutchinson estimates can be
    negative); logarithmic beyond the smallest magnitudes, since blocks differ by decades. Grey cells: the
    block was not in the model at that estimate."""
    import numpy as np
    from matplotlib.colors import Normalize, SymLogNorm

    blocks, records, rows = history.curvature_matrix()
    figure = _new_figure(6.4, max(2.4, 0.24 * len(blocks) + 1.5))
    ax = figure.add_subplot()
    if not records:
        _message(ax, "no curvature estimates recorded (add a CurvatureMonitor)")
        return figure
    values = np.ma.masked_invalid(np.asarray(rows, dtype=float))
    magnitudes = np.abs(values.compressed())
    magnitudes = magnitudes[magnitudes > 0]
    top = float(magnitudes.max()) if magnitudes.size else 1.0
    if magnitudes.size and top / magnitudes.min() > 10:
        linthresh = max(float(np.quantile(magnitudes, 0.1)), top * 1e-4)
        norm: Normalize = SymLogNorm(linthresh=linthresh, vmin=-top, vmax=top, base=10)
        scale = "symmetric log scale"
    else:
        norm = Normalize(-top, top)
        scale = "linear scale"
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=_colormap("RdBu_r"), norm=norm)
    if values.size <= 150:
        for (i, j), value in np.ndenumerate(values.filled(np.nan)):
            if math.isfinite(value):
                strong = abs(norm(value) - 0.5) > 0.35
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6, color="w" if strong else "k")
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    labels = _step_labels([r.step for r in records])
    _step_ticks(ax, labels)
    repeated = " (a, b: estimates at one step, in the order taken)" if any(not x.isdigit() for x in labels) else ""
    ax.set_xlabel(f"{STEP_LABEL} of the estimate{repeated}{_grey_note(values)}", fontsize=8)
    ax.set_title("Hessian trace per parameter, per block")
    bar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(f"trace / #params ({scale})", fontsize=8)
    bar.set_ticks(_symmetric_ticks(top, norm), labels=[f"{t:.2g}" for t in _symmetric_ticks(top, norm)])
    bar.ax.tick_params(labelsize=7)
    return figure


def _symmetric_ticks(top: float, norm: Any) -> list[float]:
    """At most 7 colour-bar ticks: 0, +-top, and decades in between (so labels never overlap)."""
    threshold = getattr(norm, "linthresh", top / 2)
    decades = [10.0**k for k in range(math.ceil(math.log10(threshold)), math.floor(math.log10(top)) + 1)]
    inner = [d for d in decades if threshold <= d < top / 3][-2:]
    positive = sorted({*inner, float(f"{top:.2g}")})
    return [-v for v in reversed(positive)] + [0.0] + positive


def build_figures(history: ArchitectureHistory) -> dict[str, Figure]:
    """Every report figure, keyed by the names in :data:`FIGURE_NAMES`."""
    return {
        "training": training_figure(history),
        "depth": depth_figure(history),
        "params_flops": params_flops_figure(history),
        "widths": widths_figure(history),
        "curvature_heatmap": curvature_heatmap_figure(history),
    }


def figure_to_png(figure: Figure, dpi: int = 100) -> bytes:
    """The rendered figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_to_svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML prolog, no metadata. Text is drawn as paths,
    so it looks the same on every machine (as text, a browser without matplotlib's font would substitute a
    wider one and labels would overflow)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "lightning-depthgrow"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as an ``H x W x 3`` uint8 array (what ``wandb.Image`` and TensorBoard take)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def write_report(history: ArchitectureHistory | str | os.PathLike, out_dir: str | os.PathLike) -> ReportFiles:
    """Write ``architecture_report.html`` (figures inlined as SVG) and one PNG per figure into ``out_dir``.

    Args:
        history: a history, or a path to its JSON file or to a directory containing one.
        out_dir: created if missing; existing report files in it are overwritten.

    Example:
        >>> files = write_report("lightning_logs/version_0", "report")  # doctest: +SKIP
        >>> files.html  # doctest: +SKIP
        'report/architecture_report.html'
    """
    if not isinstance(history, ArchitectureHistory):
        history = ArchitectureHistory.load(history)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    figures = build_figures(history)
    paths = {}
    for name, figure in figures.items():
        paths[name] = os.path.join(out_dir, f"{name}.png")
        with open(paths[name], "wb") as f:
            f.write(figure_to_png(figure))
    html_path = os.path.join(out_dir, "architecture_report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render_html(history, {name: figure_to_svg(fig) for name, fig in figures.items()}))
    return ReportFiles(html=html_path, figures=paths)


# ---------------------------------------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 0.6em 1.2em;
       max-width: 1400px; color: #222; }
h1 { font-size: 1.35em; margin: 0.2em 0; }
h2 { font-size: 1.1em; margin: 1.2em 0 0.4em; }
p.note { color: #666; font-size: 0.8em; margin: 0.2em 0 0.6em; }
.cards { display: flex; flex-wrap: wrap; gap: 0.5em; margin-bottom: 0.6em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.35em 0.8em; background: #fafafa; }
.card b { display: block; font-size: 0.75em; color: #666; font-weight: normal; }
.card span { font-size: 1.05em; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 0.4em 1em; }
.grid figure { margin: 0; }
.grid svg { width: 100%; height: auto; }
ol.events { padding-left: 1.6em; font-size: 0.9em; }
ol.events li { margin: 0.15em 0; }
ol.events summary { cursor: pointer; }
.kind { font-family: monospace; background: #eef; padding: 0 0.3em; border-radius: 3px; }
.when { color: #666; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
"""


def render_html(history: ArchitectureHistory, svgs: dict[str, str]) -> str:
    """The report page: headline numbers, inline SVG figures, one line per event, the final architecture."""
    esc = html.escape
    shown = [name for name in svgs if has_data(history, name)]
    figures = "".join(f"<figure id='fig-{esc(name)}'>{svgs[name]}</figure>" for name in shown)
    missing = [_EMPTY[name] for name in svgs if name not in shown]
    if missing:
        figures += f"<p class=note>Not shown: {esc('; '.join(missing))}.</p>"
    items = "".join(
        f"<li><details><summary><span class=when>step {e.step} (epoch {e.epoch})</span> "
        f"<span class=kind>{esc(e.kind)}</span> <b>{esc(e.block_id or e.location or '-')}</b>: {esc(e.summary)}"
        f"</summary><pre>{esc(json.dumps(e.to_dict(), indent=1))}</pre></details></li>"
        for e in history.events
    )
    events = f"<ol class=events>{items}</ol>" if history.events else "<p>No architecture events.</p>"
    final = history.final
    final_json = esc(json.dumps(final.to_dict() if final else None, indent=1))
    title = esc(str(history.metadata.get("model", "")) or "the model")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset='utf-8'>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>What happened to {title}</title><style>{_CSS}</style></head><body>"
        f"<h1>What happened to {title}, and what it bought</h1>"
        f"<p class=note>Time axis everywhere: {STEP_LABEL} (optimizer steps so far); dashed red lines are "
        "architecture events. Blocks are named by identity: <code>stack#i</code> was block i of the starting "
        "model, <code>stack#eK</code> was inserted by event K of the log (listed below).</p>"
        f"{_cards(history)}<div class=grid>{figures}</div>"
        f"<h2>Events ({len(history.events)})</h2>{events}"
        f"<h2>Final architecture</h2><details><summary>JSON</summary><pre>{final_json}</pre></details>"
        "</body></html>"
    )


_EMPTY = {
    "training": "no training metrics or events were recorded",
    "depth": "no block stacks were recorded",
    "params_flops": "no snapshots were recorded",
    "widths": "no widths (attention heads, MLP fc1, convolutions) in the block stacks",
    "curvature_heatmap": "no curvature estimates (add a CurvatureMonitor to see the curvature per block)",
}


def has_data(history: ArchitectureHistory, name: str) -> bool:
    """Whether figure ``name`` shows anything for ``history`` (else the page lists it as not shown instead)."""
    if name == "training":
        return bool(history.metrics or history.events)
    if name == "widths":
        return any(s.widths for s in history.snapshots)
    if name == "curvature_heatmap":
        return any(r.valid for r in history.curvature)
    return bool(history.snapshots and (name != "depth" or history.stacks()))


def _cards(history: ArchitectureHistory) -> str:
    """The headline: start -> end of depth, parameters, FLOPs and each training metric; the events by kind."""
    esc = html.escape
    cards: list[tuple[str, str]] = []
    if history.snapshots:
        first, final = history.snapshots[0], history.snapshots[-1]
        for stack in history.stacks():
            cards.append((f"depth {stack}", f"{first.depth.get(stack, 0)} &rarr; {final.depth.get(stack, 0)}"))
        cards.append(("parameters", _change(first.params, final.params)))
        if first.flops is not None and final.flops is not None:
            cards.append(("FLOPs per sample", _change(first.flops, final.flops)))
    for name, points in sorted(history.metrics.items(), key=lambda item: not item[0].startswith("train")):
        values = [v for _, v in points if math.isfinite(v)]
        if values:
            best = min(values) if "loss" in name.lower() else max(values)
            cards.append((name, f"{values[0]:.4g} &rarr; {values[-1]:.4g} (best {best:.4g})"))
    kinds: dict[str, int] = {}
    for event in history.events:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    cards.append(("events", ", ".join(f"{n} {esc(k)}" for k, n in kinds.items()) or "none"))
    if history.snapshots:
        cards.append(("steps (epochs)", f"{history.snapshots[-1].step} ({history.snapshots[-1].epoch})"))
    body = "".join(f"<div class=card><b>{esc(label)}</b><span>{value}</span></div>" for label, value in cards)
    return f"<div class=cards>{body}</div>"


def _change(before: float, after: float) -> str:
    ratio = f" ({after / before - 1:+.0%})" if before else ""
    return f"{format_count(before)} &rarr; {format_count(after)}{ratio}"
