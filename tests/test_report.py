"""The architecture report: figures drawn from a real run's history, the offline HTML page, the command line,
and the page as a person sees it (headless Chromium)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from test_history import InsertBlockEachEpoch, TinyClassifier, quiet_trainer

from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.history import HISTORY_FILENAME, ArchitectureHistory
from lightning_depthgrow.report import (
    FIGURE_NAMES,
    curvature_heatmap_figure,
    depth_figure,
    params_flops_figure,
    training_figure,
    widths_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ClassifierWithValidation(TinyClassifier):
    """The tiny ViT with a validation loop logging ``val_loss`` and ``val_acc``."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def val_dataloader(self):
        return self.train_dataloader()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A real 2-epoch run with growth, curvature and validation, logged by ArchitectureLogger(report=True)."""
    root = tmp_path_factory.mktemp("report_run")
    logger = CSVLogger(root, name="run")
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)
    trainer = quiet_trainer(
        max_epochs=2,
        logger=logger,
        callbacks=[monitor, InsertBlockEachEpoch(), ArchitectureLogger(report=True)],
        log_every_n_steps=1,
    )
    trainer.fit(ClassifierWithValidation())
    return logger.log_dir


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def test_figures_show_the_history(run_dir):
    history = ArchitectureHistory.load(run_dir)
    steps = [s.step for s in history.snapshots]
    assert [s.depth["model.blocks"] for s in history.snapshots] == [2, 3, 4] and steps == [0, 4, 8]
    event_steps = [e.step for e in history.events]

    # Every figure plots against the global step; event steps are marked as vertical lines.
    ax = depth_figure(history).axes[0]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == steps and list(line.get_ydata()) == [2, 3, 4]
    assert ax.get_xlabel() == "global step"
    assert sorted(ln.get_xdata()[0] for ln in ax.get_lines()[1:]) == event_steps

    params_ax, flops_ax = params_flops_figure(history).axes
    assert list(params_ax.get_lines()[0].get_ydata()) == [s.params for s in history.snapshots]
    assert list(flops_ax.get_lines()[0].get_ydata()) == [s.flops for s in history.snapshots]
    # Readable units and a legend on both panels (the params line was hidden behind the FLOPs one before).
    params_ax.figure.canvas.draw()
    labels = [t.get_text() for t in flops_ax.get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"-?[\d.]+[kMG]?", t) for t in labels) and any(t[-1] == "k" for t in labels)
    assert [t.get_text() for t in params_ax.get_legend().get_texts()] == ["parameters"]
    assert [t.get_text() for t in flops_ax.get_legend().get_texts()] == ["FLOPs per sample"]

    # Training curves: the recorded losses and validation metrics, on the same step axis.
    loss_ax, val_ax = training_figure(history).axes
    train = history.metrics["train_loss"]
    assert [p[0] for p in train] == list(range(1, 9))  # log_every_n_steps=1
    (train_line,) = [ln for ln in loss_ax.get_lines() if ln.get_label() == "train_loss"]
    assert list(train_line.get_xdata()) == [p[0] for p in train]
    (acc_line,) = [ln for ln in val_ax.get_lines() if ln.get_label() == "val_acc"]
    assert list(acc_line.get_xdata()) == [4, 8]  # after each epoch's validation

    # Curvature heat map: one row per block identity, one column per estimate, masked where a block did not
    # exist yet; a diverging colour map symmetric around 0; every column label distinct.
    blocks, records, rows = history.curvature_matrix()
    assert len(records) == 2
    assert blocks == ["stem", "model.blocks#0", "model.blocks#e0", "model.blocks#1", "head"]
    heat_ax = curvature_heatmap_figure(history).axes[0]
    image = heat_ax.images[0]
    np.testing.assert_array_equal(image.get_array().mask, np.isnan(np.asarray(rows)))
    np.testing.assert_allclose(image.get_array().filled(math.nan), np.asarray(rows))
    assert image.get_cmap().name.startswith("RdBu_r") and image.norm.vmin == -image.norm.vmax
    ticks = [t.get_text() for t in heat_ax.get_xticklabels()]
    assert len(set(ticks)) == len(ticks) == 2 and [t.rstrip("ab") for t in ticks] == [str(r.step) for r in records]
    assert [t.get_text() for t in heat_ax.get_yticklabels()] == blocks
    # The estimate of a block follows its identity: the monitor runs before each epoch's insertion, so the
    # starting block 1 was at position 1 for the first estimate and at position 2 (after #e0) for the second.
    assert rows[blocks.index("model.blocks#1")] == [
        records[0].trace_per_param["model.blocks.1"],
        records[1].trace_per_param["model.blocks.2"],
    ]

    # Widths: rows are (block identity, width), columns the snapshots where a width changed (here: blocks born).
    widths_ax = widths_figure(history).axes[0]
    keys, _, _ = history.width_matrix()
    assert ("model.blocks#e1", "mlp.fc1.out_features") in keys
    assert widths_ax.images[0].get_array().shape == (len(keys), 3)
    assert np.nanmax(widths_ax.images[0].get_array()) == 1.0  # nothing was narrowed


def test_report_written_at_train_end_and_by_the_command(run_dir, tmp_path):
    at_train_end = os.path.join(run_dir, "architecture_report")
    assert sorted(os.listdir(at_train_end)) == sorted(["architecture_report.html", *(f"{n}.png" for n in FIGURE_NAMES)])

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_depthgrow", "report", run_dir, "--out", str(out)],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    html_path = out / "architecture_report.html"
    assert result.stdout.splitlines()[0] == str(html_path)
    page = html_path.read_text()
    history = ArchitectureHistory.load(os.path.join(run_dir, HISTORY_FILENAME))

    # Every figure inline as SVG, text kept as text; a PNG of each next to the page.
    figures = re.findall(r"<figure id='fig-([a-z_]+)'><svg", page)
    assert figures == list(FIGURE_NAMES)
    assert "Hessian trace per parameter, per block" in page and "model.blocks#e1" in page
    for name in FIGURE_NAMES:
        width, height = _png_size((out / f"{name}.png").read_bytes())
        assert width == 640 and height >= 200

    # Works offline: nothing the browser would fetch (the only URLs are SVG namespace names).
    assert_no_fetches(page)

    # Headline: start -> end of depth, parameters and the validation metric.
    final = history.final
    assert "<b>depth model.blocks</b><span>2 &rarr; 4</span>" in page
    assert f"{final.params / 1000:.3g}k" in page.split("<b>parameters</b>")[1].split("</div>")[0]
    assert "<b>val_acc</b>" in page

    # One line per event (time, kind, identity, summary), its full record folded in <details>.
    items = re.findall(r"<li><details><summary>(.*?)</summary><pre>(.*?)</pre></details></li>", page, re.S)
    assert len(items) == len(history.events) == 2
    for (summary, record), event in zip(items, history.events):
        assert f"step {event.step} (epoch {event.epoch})" in summary and event.block_id in summary
        assert summary.endswith(event.summary.replace("&", "&amp;").replace(">", "&gt;"))
        assert json.loads(record.replace("&quot;", '"').replace("&#x27;", "'")) == event.to_dict()


def assert_no_fetches(page: str) -> None:
    """No attribute, style or script in ``page`` that would make a browser request anything over the network."""
    assert not re.search(r"""(?:src|href|srcset|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<script\b[^>]*\bsrc""", page, re.I)
    assert not re.search(r"""\b(?:fetch|XMLHttpRequest|WebSocket)\b""", page)
    leftover = re.sub(r"""xmlns(?::\w+)?="http://www\.w3\.org/[^"]*\"""", "", page)
    assert "http:" not in leftover and "https:" not in leftover


def test_command_reports_missing_history(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_depthgrow", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "No architecture_history.json" in result.stderr


# ---------------------------------------------------------------------------- as a person sees it


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser ({', '.join(BROWSERS)}); .ci/run installs chromium from the distribution")


def render_in_browser(html_path: str, out_dir) -> tuple[np.ndarray, list[str], list[str]]:
    """Screenshot ``html_path`` in headless Chromium: ``(RGB pixels, console messages, URLs the page requested)``.

    Console messages come from Chromium's log (``CONSOLE`` lines); requests from its network log, keeping only
    those the page's own origin (``file://``) made (the browser's own background requests are left out).
    """
    import matplotlib.image

    shot, netlog = os.path.join(out_dir, "shot.png"), os.path.join(out_dir, "netlog.json")
    command = [
        _browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--hide-scrollbars", "--window-size=1400,1000", "--enable-logging=stderr", "--v=0",
        f"--log-net-log={netlog}", f"--screenshot={shot}", f"file://{os.path.abspath(html_path)}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": out_dir})
    assert os.path.exists(shot), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    with open(netlog) as f:
        events = json.load(f).get("events", [])
    urls, page_sources = defaultdict(set), set()
    for event in events:
        params, source = event.get("params") or {}, event["source"]["id"]
        if "url" in params:
            urls[source].add(params["url"])
        if str(params.get("network_isolation_key", "")).startswith("file://"):
            page_sources.add(source)
    requested = sorted(u for s in page_sources for u in urls[s] if not u.startswith("file:"))
    return matplotlib.image.imread(shot)[..., :3], console, requested


def test_report_renders_in_a_browser_offline_without_errors(run_dir, tmp_path):
    page = os.path.join(run_dir, "architecture_report", "architecture_report.html")
    pixels, console, requested = render_in_browser(page, str(tmp_path))
    assert pixels.shape == (1000, 1400, 3)
    # Non-blank: figures and text cover a good part of the first screen, in colour.
    drawn = (pixels < 0.95).any(axis=2).mean()
    coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 0.2).mean()
    assert drawn > 0.15 and coloured > 0.02, (drawn, coloured)
    assert console == [] and requested == []

    # The checks catch what they look for: a page with a console error and a remote image.
    bad = tmp_path / "bad" / "bad.html"
    bad.parent.mkdir()
    bad.write_text("<html><body><script>console.error('broken')</script><img src='http://example.invalid/a.png'>")
    blank, console, requested = render_in_browser(str(bad), str(bad.parent))
    assert any("broken" in line for line in console)
    assert requested == ["http://example.invalid/a.png"]
    assert (blank < 0.95).any(axis=2).mean() < 0.01
    with pytest.raises(AssertionError):
        assert_no_fetches(bad.read_text())


def test_report_of_a_history_without_curvature_or_metrics(tmp_path):
    """A bare history (no monitor, no metrics) still gives a page, saying what is not shown and why."""
    from lightning_depthgrow.history import describe_architecture
    from lightning_depthgrow.report import write_report

    history = ArchitectureHistory()
    history.add_snapshot(describe_architecture(TinyClassifier(), torch.zeros(1, 1, 1, 16), epoch=0, step=0))
    page = open(write_report(history, tmp_path).html).read()
    assert re.findall(r"<figure id='fig-([a-z_]+)'>", page) == ["depth", "params_flops", "widths"]
    assert "Not shown: no training metrics or events were recorded; no curvature estimates" in page
    assert_no_fetches(page)
