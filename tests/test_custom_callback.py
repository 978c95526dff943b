"""The custom callback of docs/custom_callback.md, run as written: it grows, checkpoints and loads."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from _helpers import make_module, make_vit, quiet_trainer, random_loader

from lightning_depthgrow import load_grown
from lightning_depthgrow.events import event_log

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_callback.md"


def _doc_callback() -> type:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.splitlines()) <= 40, "the docs promise a callback in about 30 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["GrowOnPlateau"]


@pytest.mark.slow
def test_the_documented_callback_grows_saves_and_loads(tmp_path):
    grow_on_plateau = _doc_callback()
    module = make_module(max_epochs=3)
    # min_delta larger than any loss change: every epoch after the first counts as a plateau.
    trainer = quiet_trainer(
        max_epochs=3,
        callbacks=[grow_on_plateau(final_budget=3.0, min_delta=100.0)],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, random_loader())
    assert [(e.kind, e.epoch) for e in event_log(module)] == [("insert_block", 1)]
    assert len(module.model.blocks) == 3
    (ckpt,) = tmp_path.glob("**/*.ckpt")
    x = torch.randn(2, 1, 1, 40)
    with torch.no_grad():
        assert torch.equal(load_grown(make_vit(), ckpt).eval()(x), module.eval()(x))
    pickle.loads(pickle.dumps(module))


def test_change_at_must_name_a_supported_moment():
    from lightning_depthgrow.callbacks import ArchitectureCallback

    class Midway(ArchitectureCallback):
        change_at = "mid_epoch"

    with pytest.raises(ValueError, match="change_at must be 'epoch_end' or 'epoch_start'"):
        Midway()
