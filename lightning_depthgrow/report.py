"""A standalone HTML report (and PNG figures) of how a model's architecture evolved during training.

Reads an :class:`~lightning_depthgrow.history.ArchitectureHistory` (``architecture_history.json``) and
draws four figures: depth per block stack over epochs, the curvature heatmap (trace per parameter, block x
estimate), parameters and FLOPs over epochs, and the event timeline. The HTML page embeds them as base64
PNGs next to a table of every event, so it can be mailed or attached as is.

Command line::

    python -m lightning_depthgrow report lightning_logs/version_0 --out report/

Figures are drawn with matplotlib's object API on an Agg canvas (no ``pyplot``), so the report never
touches a user's global matplotlib state or needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .history import ArchitectureHistory

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

FIGURE_NAMES = ("depth", "curvature_heatmap", "params_flops", "event_timeline")


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    html: str
    figures: dict[str, str]


def _new_figure(width: float = 7.0, height: float = 3.6) -> Figure:
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


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def depth_figure(history: ArchitectureHistory) -> Figure:
    """Depth of every block stack (and in total) against completed epochs, as steps."""
    figure = _new_figure()
    ax = figure.add_subplot()
    stacks = history.stacks()
    if not history.snapshots or not stacks:
        _message(ax, "no block stacks recorded")
        return figure
    epochs = [s.epoch for s in history.snapshots]
    for path in stacks:
        ax.step(epochs, [s.depth.get(path, 0) for s in history.snapshots], where="post", marker="o", label=path)
    if len(stacks) > 1:
        ax.step(epochs, [s.total_depth for s in history.snapshots], where="post", color="k", ls="--", label="total")
    ax.set_xlabel("completed epochs")
    ax.set_ylabel("blocks")
    ax.set_title("Depth per block stack")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    return figure


def curvature_heatmap_figure(history: ArchitectureHistory) -> Figure:
    """Hessian trace per parameter of every block (rows) at every valid estimate (columns), log colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize, SymLogNorm

    blocks, records, rows = history.curvature_matrix()
    figure = _new_figure(7.0, max(2.5, 0.3 * len(blocks) + 1.5))
    ax = figure.add_subplot()
    if not records:
        _message(ax, "no curvature estimates recorded (add a CurvatureMonitor)")
        return figure
    values = np.ma.masked_invalid(np.asarray(rows, dtype=float))
    finite = values.compressed()
    positive = finite[finite > 0]
    magnitudes = np.abs(finite[finite != 0])
    # Traces per parameter span decades across blocks: a log scale shows them all; Hutchinson estimates can be
    # <= 0, and then a symmetric log scale (linear within the smallest decade) keeps the sign visible.
    log_scale = magnitudes.size > 0
    if positive.size == finite.size and positive.size > 0:
        norm = LogNorm(positive.min(), positive.max())
    elif log_scale:
        norm = SymLogNorm(linthresh=float(np.quantile(magnitudes, 0.1)), vmin=finite.min(), vmax=finite.max())
    else:
        norm = Normalize()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(len(blocks)), blocks, fontsize="small")
    ax.set_xticks(range(len(records)), [str(r.epoch) for r in records], fontsize="small")
    ax.set_xlabel("epoch of the estimate")
    ax.set_title("Hessian trace per parameter")
    figure.colorbar(image, ax=ax, label="trace / #params" + (" (log scale)" if log_scale else ""))
    return figure


def params_flops_figure(history: ArchitectureHistory) -> Figure:
    """Parameter count (left axis) and FLOPs per sample (right axis) against completed epochs."""
    figure = _new_figure()
    ax = figure.add_subplot()
    if not history.snapshots:
        _message(ax, "no snapshots recorded")
        return figure
    epochs = [s.epoch for s in history.snapshots]
    ax.step(epochs, [s.params for s in history.snapshots], where="post", marker="o", color="C0", label="params")
    ax.set_xlabel("completed epochs")
    ax.set_ylabel("parameters", color="C0")
    flops = [(s.epoch, s.flops) for s in history.snapshots if s.flops is not None]
    if flops:
        twin = ax.twinx()
        twin.step(*zip(*flops), where="post", marker="s", color="C1", label="FLOPs")
        twin.set_ylabel("FLOPs per sample", color="C1")
    ax.set_title("Parameters and FLOPs")
    return figure


def event_timeline_figure(history: ArchitectureHistory) -> Figure:
    """One marker per event at its global step, one row per event kind, labelled with its location."""
    figure = _new_figure(7.0, 1.5 + 0.5 * max(1, len({e.kind for e in history.events})))
    ax = figure.add_subplot()
    if not history.events:
        _message(ax, "no architecture events")
        return figure
    kinds = list(dict.fromkeys(e.kind for e in history.events))
    for i, kind in enumerate(kinds):
        rows = [e for e in history.events if e.kind == kind]
        ax.scatter([e.step for e in rows], [i] * len(rows), marker="D", color=f"C{i}", zorder=3)
        for e in rows:
            ax.annotate(
                e.location or kind,
                (e.step, i),
                textcoords="offset points",
                xytext=(3, 6),
                fontsize="x-small",
                rotation=30,
            )
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(-0.7, len(kinds) - 0.2)
    ax.set_xlabel("global step")
    ax.set_title("Architecture events")
    ax.grid(axis="x", alpha=0.3)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """The rendered figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_to_array(figure: Figure) -> np.ndarray:
    """The rendered figure as an ``H x W x 3`` uint8 array (what ``wandb.Image`` takes)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def build_figures(history: ArchitectureHistory) -> dict[str, Figure]:
    """Every report figure, keyed by the names in :data:`FIGURE_NAMES`."""
    return {
        "depth": depth_figure(history),
        "curvature_heatmap": curvature_heatmap_figure(history),
        "params_flops": params_flops_figure(history),
        "event_timeline": event_timeline_figure(history),
    }


def write_report(history: ArchitectureHistory | str | os.PathLike, out_dir: str | os.PathLike) -> ReportFiles:
    """Write ``architecture_report.html`` and one PNG per figure into ``out_dir``.

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
    pngs = {name: figure_to_png(fig) for name, fig in build_figures(history).items()}
    paths = {}
    for name, data in pngs.items():
        paths[name] = os.path.join(out_dir, f"{name}.png")
        with open(paths[name], "wb") as f:
            f.write(data)
    html_path = os.path.join(out_dir, "architecture_report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render_html(history, pngs))
    return ReportFiles(html=html_path, figures=paths)


_TITLES = {
    "depth": "Depth over time",
    "curvature_heatmap": "Curvature per block",
    "params_flops": "Parameters and FLOPs over time",
    "event_timeline": "Event timeline",
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.json { font-family: monospace; white-space: pre-wrap; max-width: 32em; }
img { max-width: 100%; }
"""


def render_html(history: ArchitectureHistory, pngs: dict[str, bytes]) -> str:
    """The report page: summary, embedded figures, event table, final architecture."""
    esc = html.escape
    first, final = (history.snapshots[0], history.final) if history.snapshots else (None, None)
    summary = ""
    if first is not None and final is not None:
        flops = f"{_count(first.flops)} &rarr; {_count(final.flops)}"
        summary = (
            "<table><tr><th></th><th>start</th><th>end</th></tr>"
            f"<tr><td>depth</td><td>{esc(_depths(first.depth))}</td><td>{esc(_depths(final.depth))}</td></tr>"
            f"<tr><td>parameters</td><td>{first.params:,}</td><td>{final.params:,}</td></tr>"
            f"<tr><td>FLOPs per sample</td><td colspan=2>{flops}</td></tr>"
            f"<tr><td>epochs</td><td>{first.epoch}</td><td>{final.epoch}</td></tr></table>"
        )
    figures = "".join(
        f"<h2>{esc(_TITLES[name])}</h2><img alt='{esc(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(data).decode('ascii')}'>"
        for name, data in pngs.items()
    )
    rows = "".join(
        "<tr>"
        f"<td>{e.epoch}</td><td>{e.step}</td><td>{esc(e.kind)}</td><td>{esc(e.location)}</td>"
        f"<td class=json>{esc(json.dumps(e.reason, indent=1))}</td><td class=json>{esc(json.dumps(e.cost))}</td>"
        "</tr>"
        for e in history.events
    )
    events = (
        "<table><tr><th>epoch</th><th>step</th><th>kind</th><th>location</th><th>reason</th><th>cost</th></tr>"
        f"{rows}</table>"
        if history.events
        else "<p>No architecture events.</p>"
    )
    final_json = esc(json.dumps(final.to_dict() if final else None, indent=1))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Architecture evolution</title>"
        f"<style>{_CSS}</style></head><body><h1>Architecture evolution</h1>{summary}{figures}"
        f"<h2>Events ({len(history.events)})</h2>{events}"
        f"<h2>Final architecture</h2><pre>{final_json}</pre></body></html>"
    )


def _depths(depth: dict[str, int]) -> str:
    return ", ".join(f"{path or '<root>'}: {n}" for path, n in depth.items()) or "-"


def _count(value: float | None) -> str:
    if value is None:
        return "n/a"
    exponent = int(math.log10(abs(value)) // 3) if value else 0
    exponent = max(0, min(exponent, 4))
    return f"{value / 10 ** (3 * exponent):.3g}{['', 'K', 'M', 'G', 'T'][exponent]}"
