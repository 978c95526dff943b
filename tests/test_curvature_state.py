"""An estimate leaves the model, its gradients and the RNG bitwise as they were, in any precision context."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_depthgrow.curvature import estimate_curvature, preserve_model_state, splitting_eigenvalues


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
    }


def assert_same(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k  # bitwise, incl. running stats and num_batches_tracked
    assert after["modes"] == before["modes"]
    for n, (obj, values) in before["grads"].items():
        grad = dict(model.named_parameters())[n].grad
        assert grad is obj, n  # same object, None stays None
        if values is not None:
            assert torch.equal(grad, values) and grad.grad_fn is None and not grad.requires_grad
    assert torch.equal(after["rng"], before["rng"])


def prepared_model() -> nn.Module:
    model = make_model().train()
    model[4].eval()  # a sub-module in eval mode inside a parent in train mode
    loss_fn(model, batches()[0]).backward()
    model[0].weight.grad = None  # one parameter without a gradient, the others with one
    return model


@pytest.mark.parametrize("backend", ["double_backward", "forward_over_reverse"])
def test_estimate_leaves_model_grads_and_rng_bitwise_unchanged(backend: str) -> None:
    model = prepared_model()
    before = snapshot(model)
    est = estimate_curvature(model, loss_fn, batches(), num_probes=4, top_eigen=True, eig_iters=3, backend=backend)
    assert est.valid and est.backend == backend
    assert_same(model, before)
    expected_next = torch.random.fork_rng()
    with expected_next:
        torch.set_rng_state(before["rng"])
        draw = torch.rand(3)
    assert torch.equal(torch.rand(3), draw)  # the next dropout mask of training is not shifted


def test_estimate_under_bf16_autocast_is_fp32_and_unchanged_state() -> None:
    model = prepared_model()
    reference = estimate_curvature(model, loss_fn, batches(), num_probes=4)
    before = snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est = estimate_curvature(model, loss_fn, batches(), num_probes=4)
        assert torch.is_autocast_enabled("cpu")  # the caller's context is restored
    assert_same(model, before)
    for block, trace in reference.traces.items():
        assert est.traces[block].mean == trace.mean  # computed in fp32 exactly as without autocast


def test_estimate_from_inference_mode_with_inference_batches() -> None:
    model = prepared_model()
    with torch.inference_mode():
        data = [(x.clone(), y.clone()) for x, y in batches()]
        est = estimate_curvature(model, loss_fn, data, num_probes=4)
    reference = estimate_curvature(model, loss_fn, batches(), num_probes=4)
    assert est.traces["0"].mean == reference.traces["0"].mean


def test_vit_with_drop_path_and_fused_attention_unchanged() -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(1, 8),
        patch_size=(1, 4),
        in_chans=1,
        embed_dim=8,
        depth=2,
        num_heads=2,
        num_classes=3,
        drop_rate=0.1,
        drop_path_rate=0.2,
    ).train()
    data = [(torch.randn(4, 1, 1, 8), torch.randint(0, 3, (4,)))]
    before = snapshot(vit)
    fused_before = [b.attn.fused_attn for b in vit.blocks]
    a = estimate_curvature(vit, loss_fn, data, num_probes=4, backend="double_backward")
    b = estimate_curvature(vit, loss_fn, data, num_probes=4, backend="forward_over_reverse")
    splitting_eigenvalues(vit, loss_fn, data)
    assert_same(vit, before)
    assert [blk.attn.fused_attn for blk in vit.blocks] == fused_before
    for block in a.traces:  # same drop-path masks for every probe and both backends
        assert a.traces[block].mean == pytest.approx(b.traces[block].mean, rel=1e-4, abs=1e-5)


def test_preserve_model_state_restores_after_writes_and_errors() -> None:
    model = prepared_model()
    before = snapshot(model)
    with pytest.raises(KeyError), preserve_model_state(model):
        model.eval()
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[6].weight.grad.mul_(0.0)
        model[1].running_mean.fill_(3.0)
        model[1].num_batches_tracked += 5
        model[0].weight.grad = torch.ones_like(model[0].weight)
        torch.rand(10)
        raise KeyError("boom")
    assert_same(model, before)
