"""Curvature on models and inputs a new user brings (issue 9): 0-dim parameters, ops without a second derivative,
one batch where a list is expected, NaN reports by training batch_idx, models without registered blocks, and
top eigenvalues on close spectra. Each test failed on the main branch before the fix."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from _helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.common import Classifier, make_vit
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.curvature import (
    CurvatureEstimationError,
    DenseOperator,
    InvalidBatchesError,
    estimate_curvature,
    top_eigenvalue,
)
from lightning_depthgrow.curvature.state import TwiceDifferentiable
from lightning_depthgrow.events import event_log


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def exact_hessian(model: nn.Module, batch: tuple, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        pieces = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(model, pieces, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(f, flat0)


class Tempered(nn.Module):
    """A body and a learnable 0-dim temperature (as CLIP's ``logit_scale``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.logit_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.logit_scale.exp()


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _vit_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def _small_vit() -> nn.Module:
    return make_vit(depth=2, embed_dim=16, num_heads=2, mlp_ratio=2.0)


# ---------------------------------------------------------------- item 6: 0-dim trainable parameters


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_zero_dim_parameter_trace_and_eigenvalue_match_exact_hessian(backend: str) -> None:
    torch.manual_seed(0)
    model = Tempered(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))
    blocks = {"body": ["body"], "scale": ["logit_scale"]}
    est = estimate_curvature(model, ce_loss, [batch], blocks=blocks, num_probes=64, top_eigen=True, backend=backend)
    assert est.valid and est.num_params == {"body": 51, "scale": 1}
    names = [n for n, _ in model.named_parameters()]  # a module's own parameters come first: logit_scale
    assert names[0] == "logit_scale"
    h = exact_hessian(model, batch, names)
    exact = {"body": h[1:, 1:].diagonal().sum().item(), "scale": h[0, 0].item()}
    for block, value in exact.items():
        t = est.traces[block]
        assert abs(t.mean - value) <= 4 * t.stderr + 1e-6, (block, t.mean, t.stderr, value)
    w = torch.linalg.eigvalsh(h.double())
    assert est.top_eigenvalues["model"] == pytest.approx(w[w.abs().argmax()].item(), rel=0.01)
    assert est.top_eigenvalues["scale"] == pytest.approx(h[0, 0].item(), rel=1e-4)


def test_monitor_runs_on_a_module_with_a_learnable_temperature() -> None:
    torch.manual_seed(0)
    module = Classifier(Tempered(_small_vit()), max_epochs=1)
    monitor = CurvatureMonitor(num_probes=2, log=False)
    quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0).fit(module, _loader(*_vit_data()))
    assert monitor.latest is not None and monitor.latest.valid
    assert all(math.isfinite(t.mean) for t in monitor.latest.traces.values())
    stem = module.model.body.patch_embed, module.model.body.cls_token, module.model.body.pos_embed
    assert monitor.latest.num_params["stem"] == 1 + sum(
        p.numel() for p in nn.ParameterList([*stem[0].parameters(), *stem[1:]])
    )


# ---------------------------------------------------------------- item 10: ops without a second derivative


class _FunctionalHardsigmoid(nn.Module):
    """``F.hardsigmoid`` outside an ``nn.Hardsigmoid``: the estimator does not rewrite it (it only rewrites models
    holding an ``nn.Hardsigmoid``), so torch's missing second derivative remains: the fallback under test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)


def _functional_gates(net: nn.Module) -> nn.Module:
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(module, name, _FunctionalHardsigmoid())
    return net


def _mobilenet_module(functional_gates: bool = True) -> Classifier:
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3, in_chans=1)
    module = Classifier(_functional_gates(net) if functional_gates else net, max_epochs=1)
    module.example_input_array = torch.zeros(2, 1, 16, 16)
    return module


def _mobilenet_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return _loader(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g), batch_size=4)


class GateBlock(nn.Module):
    """Squeeze-excitation-like: ``x * hardsigmoid(fc(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x))


def test_hardsigmoid_model_is_reported_invalid_naming_the_op_and_training_continues() -> None:
    module = _mobilenet_module()
    monitor = CurvatureMonitor(num_probes=2, strict=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"could not be computed.*hardsigmoid_backward.*no second derivative"):
        trainer.fit(module, _mobilenet_loader())
    assert trainer.global_step == 2 and trainer.state.finished
    assert [h["valid"] for h in monitor.history] == [False]
    assert "hardsigmoid" in monitor.latest.invalid_reason


def test_hardsigmoid_model_raises_naming_the_op_when_strict() -> None:
    module = _mobilenet_module()
    batch = next(iter(_mobilenet_loader()))
    with pytest.raises(CurvatureEstimationError, match=r"hardsigmoid_backward.*strict=False"):
        estimate_curvature(module, ce_loss, [batch], num_probes=2, strict=True)
    with pytest.warns(UserWarning, match="hardsigmoid_backward"):
        est = estimate_curvature(module, ce_loss, [batch], num_probes=2, top_eigen=True)
    assert not est.valid and all(math.isnan(t.mean) for t in est.traces.values())
    assert est.to_dict()["valid"] is False  # JSON-safe, as for NaN


def test_hard_sigmoid_is_rewritten_bitwise_and_twice_differentiable() -> None:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 4
    for dtype in (torch.float32, torch.float64):
        with TwiceDifferentiable():
            rewritten = F.hardsigmoid(x.to(dtype))
        assert torch.equal(rewritten, F.hardsigmoid(x.to(dtype)))  # the same values, not an approximation


def test_mobilenetv3_gets_a_valid_estimate_matching_exact_traces() -> None:
    # A real timm MobileNetV3 (hard-sigmoid squeeze-excitation gates, hard-swish) gets an estimate inside fit ...
    module = _mobilenet_module(functional_gates=False)
    monitor = CurvatureMonitor(num_probes=2)
    quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0).fit(module, _mobilenet_loader())
    assert monitor.latest.valid and all(math.isfinite(t.mean) for t in monitor.latest.traces.values())
    import torchvision  # torchvision's MobileNetV3 gates with nn.Hardsigmoid too

    torch.manual_seed(0)
    tv_batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no registered block stack: top-level children as blocks, with a warning
        tv = estimate_curvature(torchvision.models.mobilenet_v3_small(num_classes=3), ce_loss, [tv_batch], num_probes=2)
    assert tv.valid and all(math.isfinite(t.mean) for t in tv.traces.values())
    # ... and the traces through a hard-sigmoid gate are those of the exact float64 Hessian (within 4 SE).
    torch.manual_seed(0)
    gated = nn.Sequential(nn.Linear(6, 8), nn.Hardswish(), GateBlock(8), nn.Linear(8, 3)).double()
    x = torch.randn(32, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (32,))
    est = estimate_curvature(gated, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], num_probes=4000, seed=0)
    params = dict(gated.named_parameters())

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, p in params.items():
            values[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return F.cross_entropy(torch.func.functional_call(gated, values, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    with TwiceDifferentiable():
        exact = torch.autograd.functional.hessian(loss, flat).diagonal()
    names = [name for name, p in params.items() for _ in range(p.numel())]
    exact_gate = sum(v.item() for name, v in zip(names, exact) if name.startswith("2."))
    (block,) = [b for b in est.traces if b.endswith("2")]
    trace = est.traces[block]
    assert est.num_params[block] == sum(p.numel() for name, p in params.items() if name.startswith("2."))
    assert exact_gate > 8 * trace.stderr  # the gate block has curvature to find: a zero estimate would fail
    assert abs(trace.mean - exact_gate) <= 4 * trace.stderr, (trace.mean, exact_gate, trace.stderr)


# ---------------------------------------------------------------- item 14: inputs checked before backends


def test_one_batch_where_a_list_is_expected_is_named_as_such() -> None:
    torch.manual_seed(0)
    model = _small_vit()
    x, y = _vit_data(8)
    with pytest.raises(InvalidBatchesError, match=r"looks like ONE batch of 2 tensors.*pass \[batch\]") as info:
        estimate_curvature(model, ce_loss, (x, y), num_probes=2)
    assert "backend" not in str(info.value)
    with pytest.raises(InvalidBatchesError, match=r"got one Tensor.*pass \[batch\]"):
        estimate_curvature(model, ce_loss, x, num_probes=2)
    assert estimate_curvature(model, ce_loss, [(x, y)], num_probes=2).valid  # the right call works


SENTINEL = 1234.0


def _nan_on_sentinel(module: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    loss = F.cross_entropy(module(x), y)
    return loss * float("nan") if bool((x == SENTINEL).any()) else loss


def test_nan_report_names_the_training_batch_idx() -> None:
    x, y = _vit_data(24)
    x[20, 0, 0, 0] = SENTINEL  # only in the batch with batch_idx 2 (batches of 8)
    torch.manual_seed(0)
    monitor = CurvatureMonitor(num_batches=2, num_probes=2, loss_fn=_nan_on_sentinel, log=False)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0)
    with pytest.warns(UserWarning, match="not finite"):
        trainer.fit(Classifier(_small_vit(), max_epochs=1), _loader(x, y))
    reason = monitor.latest.invalid_reason
    assert "loss itself is not finite on training batch_idx 2" in reason, reason
    assert "batch_idx 1" not in reason


# ---------------------------------------------------------------- item 16: no registered blocks


class PlainModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 10))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_model_gets_distinct_block_names_and_a_warning() -> None:
    torch.manual_seed(0)
    monitor = CurvatureMonitor(num_probes=2, top_eigen=True)
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0)
    with pytest.warns(UserWarning, match="No registered block structure"):
        trainer.fit(PlainModule(), _loader(*_vit_data()))
    assert set(monitor.latest.traces) == {"model.0", "model.2"}
    assert set(monitor.latest.top_eigenvalues) == {"model", "model.0", "model.2"}  # "model": the whole model
    assert "curvature/trace/model" not in trainer.callback_metrics
    assert "curvature/trace/model.0" in trainer.callback_metrics


def test_a_child_named_model_next_to_others_is_not_reported_as_the_whole_model() -> None:
    class TwoChildren(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.model(x)))

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g))
    with pytest.warns(UserWarning, match="No registered block structure"):
        est = estimate_curvature(TwoChildren(), ce_loss, [batch], num_probes=2, top_eigen=True)
    assert set(est.traces) == {"model_block", "head"}


# ---------------------------------------------------------------- item 17: top eigenvalue on close spectra


def close_spectrum(seed: int, ratio: float, n: int = 200) -> tuple[torch.Tensor, float]:
    """A symmetric matrix with eigenvalues 10, ``10 * ratio`` and a bulk in [-3, 5), in a random basis."""
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 2, generator=g, dtype=torch.float64) * 8.0 - 3.0
    values = torch.cat([torch.tensor([10.0, 10.0 * ratio], dtype=torch.float64), bulk])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * values) @ q.T, 10.0


@pytest.mark.parametrize("ratio", [0.84, 0.9])
def test_default_top_eigenvalue_within_one_percent_on_close_spectra_in_40_of_40_seeds(ratio: float) -> None:
    ours, power = [], []
    for seed in range(40):
        matrix, top = close_spectrum(seed, ratio)
        op = DenseOperator(matrix.float(), [(120,), (80,)])
        used: dict[str, int] = {}
        value = top_eigenvalue(op, generator=torch.Generator().manual_seed(seed), iterations=used)["model"]
        assert value == pytest.approx(top, rel=0.01), (seed, value)
        ours.append(used["model"])
        # PyHessian's power iteration with its defaults (100 iterations, stop when the estimate changes < 1e-3).
        used = {}
        top_eigenvalue(op, None, 100, 1e-3, torch.Generator().manual_seed(seed), method="power", iterations=used)
        power.append(used["model"])
    assert sum(ours) <= sum(power), (sum(ours), sum(power))


def test_default_top_eigenvalues_of_a_model_within_one_percent_of_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    names = [n for n, _ in model.named_parameters()]
    h = exact_hessian(model, batch, names)

    def dominant(m: torch.Tensor) -> float:
        w = torch.linalg.eigvalsh(m.double())
        return w[w.abs().argmax()].item()

    for seed in range(5):
        est = estimate_curvature(model, ce_loss, [batch], num_probes=2, top_eigen=True, seed=seed)
        assert est.top_eigenvalues["model"] == pytest.approx(dominant(h), rel=0.01)
        assert est.top_eigenvalues["2"] == pytest.approx(dominant(h[40:112, 40:112]), rel=0.01)


def test_curvature_placement_falls_back_to_uniform_with_a_warning_naming_the_op() -> None:
    # Issue 9 item 10, growth side: an invalid estimate (hardsigmoid has no second derivative) does not stop the
    # run; the growth step places its block uniformly and says why.
    module = _mobilenet_module()
    module.max_epochs = 2
    growth = DepthGrowth.paper(final_budget=1.5, warmup_epochs=1, blocks_per_step=1, placement="curvature")
    trainer = quiet_trainer(max_epochs=2, callbacks=[growth], limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"not valid.*hardsigmoid_backward.*uniformly instead of by curvature"):
        trainer.fit(module, _mobilenet_loader())
    assert trainer.state.finished
    (event,) = [e for e in event_log(module) if e.kind == "insert_block"]
    assert event.reason["placement"] == "uniform"
