"""bench_growth_lm's end-of-training loss on fixed windows of the training bytes (``train_loss_end``, the
train-vs-val gap of the 3,000-step study): the right windows, the module's mode left as it was, recorded per run."""

from __future__ import annotations

import math

import torch

from benchmarks.bench_growth_lm import main, train_window_loss
from benchmarks.tasks import CorpusConfig, LMConfig, lm_loss, make_gpt, stdlib_corpus, val_batch

SMALL = LMConfig(
    depth=1, dim=8, heads=2, context=16, val_windows=4, corpus=CorpusConfig(train_bytes=5000, val_bytes=500)
)


def test_train_window_loss_is_the_loss_on_windows_spread_over_the_training_bytes():
    torch.manual_seed(0)
    model = make_gpt(SMALL)
    model.train()
    train, _, _ = stdlib_corpus(SMALL.corpus)
    offsets = torch.linspace(0, len(train) - SMALL.context - 1, SMALL.val_windows).long()
    batch = torch.stack([train[o : o + SMALL.context + 1].long() for o in offsets.tolist()])
    with torch.no_grad():
        expected = float(lm_loss(model.eval(), batch))
        on_val = float(lm_loss(model, val_batch(SMALL)))
    model.train()
    got = train_window_loss(model, SMALL)
    assert got == expected
    assert got != on_val  # other bytes than the validation windows
    assert model.training  # mode restored


def test_each_run_records_its_train_loss_end(tmp_path):
    record = main(["--seeds", "0", "--steps", "4", "--variants", "fixed_2", "--out", str(tmp_path / "r.json")])
    (run,) = record["runs"]["fixed_2"]
    assert math.isfinite(run["train_loss_end"]) and 0 < run["train_loss_end"] < 6
    assert run["train_loss_end"] != run["val_loss"]
