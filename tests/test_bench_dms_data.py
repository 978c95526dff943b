"""The MNIST-1D data-rich protocol (``train_draws``: extra training draws) of the data module and the DMS benchmarks."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_dms import BenchData
from examples.common import MNIST1DDataModule, mnist1d_tensors


def _setup(**kwargs) -> BenchData:
    data = BenchData(batch_size=128, seed=0, **kwargs)
    data.setup("fit")
    return data


def test_train_draws_add_every_signal_of_each_draw_after_the_training_set_and_leave_validation_alone() -> None:
    plain = _setup(extra=500)
    rich = _setup(extra=500, train_draws=(44, 45))
    x0, y0 = plain.train_set.tensors
    x, y = rich.train_set.tensors
    assert len(x0) == 4000 and len(x) == 4000 + 2 * 5000
    assert torch.equal(x[:4000], x0) and torch.equal(y[:4000], y0)
    xa, ya, xb, yb = mnist1d_tensors(44)
    assert torch.equal(y[4000:8000], ya)
    assert torch.equal(x[4000:8000], xa) and torch.equal(x[8000:9000], xb) and torch.equal(y[8000:9000], yb)
    assert not torch.equal(x[9000:13000], xa)  # draw 45 is another draw
    for a, b in zip(plain.val_set.tensors, rich.val_set.tensors):
        assert torch.equal(a, b)
    again = _setup(extra=500, train_draws=(44, 45))
    assert torch.equal(again.train_set.tensors[0], x)


def test_train_draws_refuse_the_validation_draws() -> None:
    for draw in (42, 43):
        with pytest.raises(ValueError, match="validation draws"):
            BenchData(train_draws=(44, draw))


def test_the_examples_data_module_holds_the_protocol_and_bench_data_only_adds_validation() -> None:
    base = MNIST1DDataModule(batch_size=128, seed=0, train_draws=(44, 45))
    base.setup("fit")
    bench = _setup(extra=500, train_draws=(44, 45))
    for a, b in zip(base.train_set.tensors, bench.train_set.tensors):
        assert torch.equal(a, b)
    xv, yv = base.val_set.tensors
    assert len(xv) == 1000 and len(bench.val_set.tensors[0]) == 1500
    assert torch.equal(xv, mnist1d_tensors()[2]) and torch.equal(yv, mnist1d_tensors()[3])
    assert torch.equal(bench.val_set.tensors[0][:1000], xv)
    plain = MNIST1DDataModule()
    plain.setup("fit")
    assert len(plain.train_set) == 4000 and plain.train_draws == ()
    loader = base.train_dataloader()
    assert len(loader) == (4000 + 2 * 5000) // 128  # drop_last


def test_the_data_module_refuses_validation_and_repeated_draws() -> None:
    for draw in (42, 43):
        with pytest.raises(ValueError, match="validation draws 42 and 43"):
            MNIST1DDataModule(train_draws=(draw,))
    with pytest.raises(ValueError, match="repeats a draw"):
        MNIST1DDataModule(train_draws=(44, 44))
