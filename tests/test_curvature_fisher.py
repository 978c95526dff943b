"""The opt-in empirical Fisher trace: exact against per-sample gradients computed one sample at a time."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import quiet_trainer, tensor_hash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.common import Classifier, make_vit
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.curvature import discover_blocks, empirical_fisher_trace


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return make_vit(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2.0)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in (6, 4)]


def exact_fisher(model: nn.Module, batches: list, groups: dict[str, list[str]]) -> dict[str, list[float]]:
    """Per block, ``||g_{n,B}||^2`` for every sample, one sample at a time."""
    params = dict(model.named_parameters())
    out: dict[str, list[float]] = {b: [] for b in groups}
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = dict(
                zip(params, torch.autograd.grad(ce_loss(model, (x[i : i + 1], y[i : i + 1])), list(params.values())))
            )
            for block, members in groups.items():
                out[block].append(sum(grads[n].double().pow(2).sum().item() for n in members))
    return out


def test_empirical_fisher_trace_equals_per_sample_gradient_norms_and_leaves_the_model_untouched() -> None:
    model = _vit().train()
    batches = _batches()
    before = tensor_hash(model)
    fisher = empirical_fisher_trace(model, ce_loss, batches, sample_chunk=3)
    assert tensor_hash(model) == before and all(p.grad is None for p in model.parameters())
    exact = exact_fisher(model, batches, discover_blocks(model))
    assert set(fisher) == set(exact)
    for block, values in exact.items():
        t = fisher[block]
        assert t.num_probes == 10 and t.mean > 0
        assert t.mean == pytest.approx(sum(values) / 10, rel=1e-4)
        mean = sum(values) / 10
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / 9 / 10)
        assert t.stderr == pytest.approx(stderr, rel=1e-3)


def test_empirical_fisher_refuses_batchnorm_in_train_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="BatchNorm1d in train mode"):
        empirical_fisher_trace(model, ce_loss, [batch])
    assert empirical_fisher_trace(model.eval(), ce_loss, [batch])["0"].mean > 0  # eval: samples independent


def test_monitor_with_empirical_fisher_in_fit() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 1, 40, generator=g), torch.randint(0, 10, (16,), generator=g))
    monitor = CurvatureMonitor(quantity="empirical_fisher", num_batches=2)
    module = Classifier(_vit(), max_epochs=1)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=8))
    est = monitor.latest
    assert est.valid and est.backend == "empirical_fisher" and est.top_eigenvalues == {}
    assert all(t.num_probes == 16 and t.mean > 0 for t in est.traces.values())
    # The same numbers as the function on the same samples with the module's training-step loss.
    direct = empirical_fisher_trace(
        module, ce_loss, [tuple(t[:8] for t in data.tensors), tuple(t[8:] for t in data.tensors)]
    )
    for block, t in est.traces.items():
        assert t.mean == pytest.approx(direct[block].mean, rel=1e-4)
    assert "curvature/trace/model.blocks.0" in trainer.callback_metrics
    with pytest.raises(ValueError, match="top_eigen"):
        CurvatureMonitor(quantity="empirical_fisher", top_eigen=True)
    with pytest.raises(ValueError, match="quantity"):
        CurvatureMonitor(quantity="ggn")
