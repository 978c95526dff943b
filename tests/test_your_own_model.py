"""docs/your_own_model.md, run as written: its code blocks in order, as one script; the messages it quotes are
the ones the code prints; what its comments say the code prints is checked here."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from lightning_depthgrow.adapters import unregister_block
from lightning_depthgrow.dms import unregister_dms_family
from lightning_depthgrow.surgery.ramp import RAMP_BUFFER, is_ramped

DOC = Path(__file__).resolve().parents[1] / "docs" / "your_own_model.md"


def _run_doc() -> tuple[dict, str]:
    text = DOC.read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    namespace: dict = {"__name__": "your_own_model"}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        for name in ("MLPBlock", "PostNormBlock"):
            if name in namespace:
                unregister_block(namespace[name])
        if "hidden" in namespace:
            unregister_dms_family(namespace["hidden"])
    return namespace, out.getvalue()


def _quotes(text: str) -> list[str]:
    """The doc's block quotes, each joined into one line."""
    quotes, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("> "):
            current.append(line[2:].strip())
        elif current:
            quotes.append(" ".join(current))
            current = []
    return quotes


@pytest.mark.slow
def test_the_page_runs_and_prints_what_it_says():
    torch.set_num_threads(1)
    ns, printed = _run_doc()
    lines = printed.splitlines()
    printed_flat = " ".join(printed.split())
    # Register the block: the stack can grow, checked on x.
    assert lines[0] == "{'blocks': None}"
    # Grow it in a Trainer: the default makes the 2-block stack 3x deeper.
    assert lines[1] == "6"
    # Every message the page quotes is what the code printed (the page cannot drift from the library).
    quotes = _quotes(DOC.read_text())
    assert len(quotes) == 2
    for quote in quotes:
        assert quote in printed_flat, f"docs/your_own_model.md quotes a message the code no longer prints:\n{quote}"
    # The ramp: a copy enters at a = 0 (outputs bitwise equal) and is folded after its 100 steps.
    assert "3 True" in lines and "['blocks.2']" in lines
    assert not any(is_ramped(block) for block in ns["post_norm"].blocks)
    assert not any(key.endswith(RAMP_BUFFER) for key in ns["post_norm"].state_dict())
    # DMS: the family adds a width gate per block, and the exported model meets the target within 5%.
    assert "['blocks:depth']" in lines and "['blocks/0:hidden', 'blocks/1:hidden', 'blocks:depth']" in lines
    assert abs(ns["exported_ratio"] / 0.5 - 1) <= 0.05
    assert all(block.fc1.out_features < 64 for block in ns["module"].net.blocks)
