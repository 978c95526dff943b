"""The architecture report: figures drawn from a real run's history, the HTML page, and the command line."""

from __future__ import annotations

import base64
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from test_history import InsertBlockEachEpoch, TinyClassifier, quiet_trainer

from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.history import HISTORY_FILENAME, ArchitectureHistory
from lightning_depthgrow.report import FIGURE_NAMES, curvature_heatmap_figure, depth_figure, params_flops_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A real 2-epoch run with growth and curvature, logged by ArchitectureLogger(report=True)."""
    root = tmp_path_factory.mktemp("report_run")
    logger = CSVLogger(root, name="run")
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)
    trainer = quiet_trainer(
        max_epochs=2, logger=logger, callbacks=[monitor, InsertBlockEachEpoch(), ArchitectureLogger(report=True)]
    )
    trainer.fit(TinyClassifier())
    return logger.log_dir


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def test_figures_show_the_history(run_dir):
    history = ArchitectureHistory.load(run_dir)
    assert [s.depth["model.blocks"] for s in history.snapshots] == [2, 3, 4]

    (line,) = depth_figure(history).axes[0].get_lines()
    assert list(line.get_xdata()) == [0, 1, 2] and list(line.get_ydata()) == [2, 3, 4]

    ax = params_flops_figure(history).axes
    assert list(ax[0].get_lines()[0].get_ydata()) == [s.params for s in history.snapshots]
    assert list(ax[1].get_lines()[0].get_ydata()) == [s.flops for s in history.snapshots]

    # Heatmap: one row per block ever seen, one column per estimate; blocks absent at the time are masked.
    blocks, records, rows = history.curvature_matrix()
    assert len(records) == 2
    assert blocks == ["stem", "model.blocks.0", "model.blocks.1", "model.blocks.2", "head"]
    shown = curvature_heatmap_figure(history).axes[0].images[0].get_array()
    np.testing.assert_array_equal(shown.mask, np.isnan(np.asarray(rows)))
    np.testing.assert_allclose(shown.filled(math.nan), np.asarray(rows))


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
    html = html_path.read_text()

    # Every figure is embedded, byte for byte the PNG written next to the page.
    embedded = re.findall(r"<img alt='([a-z_]+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", html)
    assert [name for name, _ in embedded] == list(FIGURE_NAMES)
    history = ArchitectureHistory.load(os.path.join(run_dir, HISTORY_FILENAME))
    for name, data in embedded:
        png = (out / f"{name}.png").read_bytes()
        assert base64.b64decode(data) == png
        width, height = _png_size(png)
        assert width == 700 and height >= 150

    # The events table: one row per event with its epoch, kind and location.
    table = html.split("<h2>Events (2)</h2>")[1].split("</table>")[0]
    cells = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td>([a-z_]+)</td><td>([\w.]+)</td>", table)
    assert cells == [(str(e.epoch), str(e.step), e.kind, e.location) for e in history.events]
    assert [c[3] for c in cells] == ["model.blocks.1", "model.blocks.1"]


def test_command_reports_missing_history(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_depthgrow", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "No architecture_history.json" in result.stderr
