"""Curvature estimators against exact dense Hessians on tiny models (MLP, BatchNorm CNN, timm ViT)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_depthgrow.curvature import (
    CurvatureEstimate,
    CurvatureEstimationError,
    CurvatureOutOfMemoryError,
    DenseOperator,
    HessianOperator,
    LossFunctionError,
    TraceEstimate,
    discover_blocks,
    estimate_curvature,
    hutchinson_trace,
    rademacher,
    resolve_blocks,
    splitting_eigenvalues,
    top_eigenvalue,
)
from lightning_depthgrow.curvature.hvp import DEFAULT_PROBE_CHUNK

BACKENDS = ["double_backward", "forward_over_reverse"]


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def make_mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def make_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(1, 8),
        patch_size=(1, 4),
        in_chans=1,
        embed_dim=8,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=3,
    )


def batches_for(kind: str, n_batches: int = 1, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (6, 4), "cnn": (6, 1, 5, 5), "vit": (6, 1, 1, 8)}[kind]
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n_batches)]


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "vit": make_vit}


def exact_hessian(model: nn.Module, batches: list, names: list[str], seed: int = 0) -> torch.Tensor:
    """Dense Hessian of mean_b CE(model(x_b)) over the flattened named parameters, dropout seeded like ours."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        pieces = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        total = 0.0
        for b, (x, y) in enumerate(batches):
            torch.manual_seed(seed + b)
            total = total + F.cross_entropy(functional_call(model, pieces, (x,)), y)
        return total / len(batches)

    with torch.random.fork_rng(), sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat0)


def block_slices(names: list[str], groups: dict[str, list[str]], model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    offsets, pos = {}, 0
    for n in names:
        offsets[n] = torch.arange(pos, pos + params[n].numel())
        pos += params[n].numel()
    return {b: torch.cat([offsets[n] for n in members]) for b, members in groups.items()}


# ---------------------------------------------------------------- pure estimators on dense matrices


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2


def test_hutchinson_dense_within_three_standard_errors_and_exact_on_diagonal() -> None:
    a = random_symmetric(12, 0)
    op = DenseOperator(a, [(3,), (4, 2), (1,)])
    blocks = {"x": [0], "y": [1], "z": [2], "xy": [0, 1]}
    est = hutchinson_trace(op, blocks, num_probes=200, generator=torch.Generator().manual_seed(3))
    exact = {"x": a[:3, :3].trace(), "y": a[3:11, 3:11].trace(), "z": a[11, 11], "xy": a[:11, :11].trace()}
    for b, t in est.items():
        assert t.num_probes == 200 and len(t.values) == 200
        assert 0 < t.stderr < 2.0
        assert abs(t.mean - exact[b].item()) < 3 * t.stderr, (b, t.mean, exact[b])
    diag = DenseOperator(torch.diag(torch.arange(1.0, 5.0)), [(2,), (2,)])
    est = hutchinson_trace(diag, {"a": [0], "b": [1]}, num_probes=3)
    assert (est["a"].mean, est["a"].stderr, est["b"].mean) == (3.0, 0.0, 7.0)


def test_hutchinson_rtol_stops_early_only_when_converged() -> None:
    diag = DenseOperator(torch.diag(torch.arange(1.0, 5.0)), [(4,)])
    assert hutchinson_trace(diag, None, num_probes=64, rtol=0.01, chunk_size=4)["model"].num_probes == 4
    noisy = DenseOperator(random_symmetric(10, 1) + 5 * torch.eye(10, dtype=torch.float64), [(10,)])
    loose = hutchinson_trace(noisy, None, num_probes=400, rtol=0.2, chunk_size=4)["model"]
    tight = hutchinson_trace(noisy, None, num_probes=400, rtol=1e-6, chunk_size=4)["model"]
    assert loose.num_probes < 400 and loose.stderr < 0.2 * abs(loose.mean)
    assert tight.num_probes == 400


def test_rademacher_signs_and_probe_i_independent_of_chunking() -> None:
    shapes = [torch.Size([3, 5]), torch.Size([7]), torch.Size([2, 1, 2])]
    together = rademacher(shapes, 6, torch.float64, torch.device("cpu"), torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    apart = [rademacher(shapes, k, torch.float64, torch.device("cpu"), g) for k in (1, 2, 3)]
    for j, shape in enumerate(shapes):
        assert together[j].shape == (6, *shape) and together[j].dtype == torch.float64
        assert torch.equal(together[j], torch.cat([a[j] for a in apart]))
        assert set(together[j].unique().tolist()) == {-1.0, 1.0}
    # Unbiased and uncorrelated signs: E[v] = 0 and E[v v^T] = I (loose bounds for 4,000 draws).
    flat = torch.cat([v.flatten(1) for v in rademacher(shapes, 4000, torch.float64, torch.device("cpu"), g)], 1)
    assert flat.mean(0).abs().max() < 0.1
    assert (flat.T @ flat / 4000 - torch.eye(flat.shape[1], dtype=torch.float64)).abs().max() < 0.1


def test_hutchinson_values_do_not_depend_on_chunk_size() -> None:
    op = DenseOperator(random_symmetric(9, 2), [(4,), (5,)])
    blocks = {"a": [0], "b": [1]}
    runs = [
        hutchinson_trace(op, blocks, num_probes=10, generator=torch.Generator().manual_seed(7), chunk_size=c)
        for c in (1, 3, 10)
    ]
    for est in runs[1:]:
        for b in blocks:
            assert est[b].values == pytest.approx(runs[0][b].values, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        hutchinson_trace(op, blocks, num_probes=4, chunk_size=0)


def test_estimate_same_with_looped_and_batched_probes_and_default_chunk_per_backend() -> None:
    model = make_vit().train()
    batches = batches_for("vit")
    looped = estimate_curvature(model, ce_loss, batches, num_probes=6, backend="double_backward", probe_chunk=1)
    batched = estimate_curvature(model, ce_loss, batches, num_probes=6, backend="double_backward", probe_chunk=4)
    default = estimate_curvature(model, ce_loss, batches, num_probes=6, backend="double_backward")
    for block, t in looped.traces.items():
        assert batched.traces[block].values == pytest.approx(t.values, rel=1e-4, abs=1e-6)
        assert default.traces[block].values == t.values  # default chunk for double backward is 1
    names = [n for n, _ in model.named_parameters()]
    assert HessianOperator(model, ce_loss, batches, names).probe_chunk == DEFAULT_PROBE_CHUNK["double_backward"] == 1
    assert HessianOperator(model, ce_loss, batches, names, backend="forward_over_reverse").probe_chunk == 8


def test_top_eigenvalue_dense_matches_eigvalsh_with_sign() -> None:
    a = random_symmetric(9, 2)
    op = DenseOperator(a, [(4,), (5,)])
    eig = top_eigenvalue(op, {"first": [0], "second": [1]}, num_iters=2000, tol=1e-12)

    def dominant(m: torch.Tensor) -> float:
        w = torch.linalg.eigvalsh(m)
        return w[w.abs().argmax()].item()

    assert eig["model"] == pytest.approx(dominant(a), rel=1e-6)
    assert eig["first"] == pytest.approx(dominant(a[:4, :4]), rel=1e-6)
    assert eig["second"] == pytest.approx(dominant(a[4:, 4:]), rel=1e-6)
    assert top_eigenvalue(DenseOperator(-4 * torch.eye(3), [(3,)]))["model"] == pytest.approx(-4.0)


# ---------------------------------------------------------------- Hessian-vector products and estimates on models


@pytest.mark.parametrize("kind", ["mlp", "cnn", "vit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hvp_equals_exact_hessian_times_vectors(kind: str, backend: str) -> None:
    model = MODELS[kind]().train()
    batches = batches_for(kind, n_batches=2)
    names = [n for n, p in model.named_parameters()]
    h = exact_hessian(model, batches, names)
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(3, *p.shape, generator=g) for p in model.parameters()]
    with HessianOperator(model, ce_loss, batches, names, backend=backend, probe_chunk=2) as op:
        products = op.matmat(vectors)
    flat_v = torch.cat([v.reshape(3, -1) for v in vectors], 1)
    flat_hv = torch.cat([p.reshape(3, -1) for p in products], 1)
    torch.testing.assert_close(flat_hv, flat_v @ h.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "vit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_traces_and_top_eigenvalues_match_exact_hessian(kind: str, backend: str) -> None:
    model = MODELS[kind]().train()
    if kind == "vit":
        assert model.blocks[0].attn.fused_attn  # the estimator must switch to the math kernel itself
    batches = batches_for(kind)
    est = estimate_curvature(
        model, ce_loss, batches, num_probes=96, backend=backend, top_eigen=True, eig_iters=1000, eig_tol=1e-8
    )
    assert est.valid and est.backend == backend
    groups = resolve_blocks(model, None)
    names = [n for members in groups.values() for n in members]
    h = exact_hessian(model, batches, names)
    slices = block_slices(names, groups, model)
    assert set(est.traces) == set(groups) and len(groups) >= 2
    for b, idx in slices.items():
        exact = h[idx][:, idx].diagonal().sum().item()
        t = est.traces[b]
        assert t.num_probes == 96 and est.num_params[b] == idx.numel()
        assert abs(t.mean - exact) <= 3 * t.stderr, (b, t.mean, t.stderr, exact)
        assert est.trace_per_param[b] == pytest.approx(t.mean / idx.numel())

    def dominant(m: torch.Tensor) -> float:
        w = torch.linalg.eigvalsh(m.double())
        return w[w.abs().argmax()].item()

    assert est.top_eigenvalues["model"] == pytest.approx(dominant(h), rel=0.01)
    block = max(slices, key=lambda b: slices[b].numel())
    assert est.top_eigenvalues[block] == pytest.approx(dominant(h[slices[block]][:, slices[block]]), rel=0.01)


def test_dropout_masks_fixed_per_batch_and_backends_agree() -> None:
    model = make_mlp(dropout=0.3).train()
    batches = batches_for("mlp", n_batches=2)
    names = [n for n, _ in model.named_parameters()]
    h = exact_hessian(model, batches, names, seed=5)  # same masks: manual_seed(seed + b) before batch b
    vectors = [torch.ones(2, *p.shape) for p in model.parameters()]
    for backend in BACKENDS:
        with HessianOperator(model, ce_loss, batches, names, backend=backend, seed=5) as op:
            hv = torch.cat([p.reshape(2, -1) for p in op.matmat(vectors)], 1)
        torch.testing.assert_close(hv[0], h @ torch.ones(h.shape[0]), rtol=1e-4, atol=1e-5)
    a = estimate_curvature(model, ce_loss, batches, backend="double_backward", num_probes=4, seed=5)
    b = estimate_curvature(model, ce_loss, batches, backend="forward_over_reverse", num_probes=4, seed=5)
    for block in a.traces:
        assert a.traces[block].mean == pytest.approx(b.traces[block].mean, rel=1e-4, abs=1e-6)


def test_rtol_early_stop_on_model_reports_fewer_probes() -> None:
    model = make_mlp()
    est = estimate_curvature(model, ce_loss, batches_for("mlp"), num_probes=400, rtol=0.5)
    counts = {t.num_probes for t in est.traces.values()}
    assert len(counts) == 1 and counts.pop() < 400
    assert all(t.stderr < 0.5 * abs(t.mean) for t in est.traces.values())


# ---------------------------------------------------------------- failures


def test_nan_loss_marks_invalid_and_strict_raises() -> None:
    model = make_mlp()

    def nan_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        return ce_loss(m, batch) * torch.tensor(float("nan"))

    est = estimate_curvature(model, nan_loss, batches_for("mlp"), num_probes=2)
    assert not est.valid
    assert "'0'" in est.invalid_reason and "loss itself is not finite on batch 0" in est.invalid_reason
    assert est.to_dict()["traces"]["0"]["mean"] is None  # JSON-safe
    with pytest.raises(CurvatureEstimationError, match="not finite"):
        estimate_curvature(model, nan_loss, batches_for("mlp"), num_probes=2, strict=True)


def test_bad_loss_fn_outputs_give_clear_errors() -> None:
    model = make_mlp()
    with pytest.raises(LossFunctionError, match="return only the loss"):
        estimate_curvature(model, lambda m, b: {"loss": ce_loss(m, b)}, batches_for("mlp"))
    with pytest.raises(LossFunctionError, match=r"shape \(6,\).*mean"):
        estimate_curvature(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches_for("mlp"))
    with pytest.raises(LossFunctionError, match="no_grad"):
        estimate_curvature(model, lambda m, b: ce_loss(m, b).detach(), batches_for("mlp"))
    with pytest.raises(ValueError, match="num_probes"):
        estimate_curvature(model, ce_loss, batches_for("mlp"), num_probes=1)
    with pytest.raises(ValueError, match="backend"):
        estimate_curvature(model, ce_loss, batches_for("mlp"), backend="pyhessian")


def test_out_of_memory_becomes_advice_to_use_fewer_batches() -> None:
    def oom_loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    with pytest.raises(CurvatureOutOfMemoryError, match="fewer or smaller batches"):
        estimate_curvature(make_mlp(), oom_loss, batches_for("mlp"))


class _Cube(torch.autograd.Function):
    """x**3 whose backward cannot be differentiated by autograd (like a fused kernel) but supports torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise RuntimeError("derivative for cube_backward is not implemented")
        return 3 * x * x * grad

    @staticmethod
    def jvp(ctx: object, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * tangent


class _CubeAutogradOnly(torch.autograd.Function):
    """The same without torch.func support: no backend can differentiate it twice."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for cube_backward is not implemented")
        return 3 * x * x * grad


def test_auto_falls_back_to_forward_over_reverse_and_reports_every_failure() -> None:
    model = make_mlp()
    batches = batches_for("mlp")

    def reference(m: nn.Module, batch: tuple) -> torch.Tensor:
        return (m(batch[0]) ** 3).mean()

    def custom(m: nn.Module, batch: tuple) -> torch.Tensor:
        return _Cube.apply(m(batch[0])).mean()

    expected = estimate_curvature(model, reference, batches, backend="double_backward")
    got = estimate_curvature(model, custom, batches)
    assert got.backend == "forward_over_reverse"
    for block in expected.traces:
        assert got.traces[block].mean == pytest.approx(expected.traces[block].mean, rel=1e-4)
    with pytest.raises(CurvatureEstimationError, match="double_backward: RuntimeError: derivative for cube_backward"):
        estimate_curvature(model, custom, batches, backend="double_backward", strict=True)
    with pytest.warns(UserWarning, match="cube_backward, which has no second derivative"):
        invalid = estimate_curvature(model, custom, batches, backend="double_backward")
    assert not invalid.valid and "cube_backward" in invalid.invalid_reason

    def unsupported(m: nn.Module, batch: tuple) -> torch.Tensor:
        return _CubeAutogradOnly.apply(m(batch[0])).mean()

    with pytest.raises(CurvatureEstimationError, match=r"double_backward.*forward_over_reverse.*setup_context"):
        estimate_curvature(model, unsupported, batches)


# ---------------------------------------------------------------- pack / unpack for DDP


def test_pack_sum_unpack_equals_pooled_probes() -> None:
    model = make_mlp()
    e1 = estimate_curvature(model, ce_loss, batches_for("mlp", seed=1), num_probes=5, top_eigen=True, seed=0)
    e2 = estimate_curvature(model, ce_loss, batches_for("mlp", seed=2), num_probes=7, top_eigen=True, seed=1)
    combined = CurvatureEstimate.unpack(e1.pack() + e2.pack(), like=e1, world_size=2)
    assert combined.valid and list(combined.traces) == list(e1.traces)
    for block in e1.traces:
        pooled = TraceEstimate.from_values(e1.traces[block].values + e2.traces[block].values)
        got = combined.traces[block]
        assert got.num_probes == 12
        assert got.mean == pytest.approx(pooled.mean, rel=1e-12, abs=1e-12)
        assert got.stderr == pytest.approx(pooled.stderr, rel=1e-9)
    for key in e1.top_eigenvalues:
        assert combined.top_eigenvalues[key] == pytest.approx((e1.top_eigenvalues[key] + e2.top_eigenvalues[key]) / 2)
    invalid = CurvatureEstimate(e2.traces, e2.num_params, e2.top_eigenvalues, False, "nan in '0'")
    merged = CurvatureEstimate.unpack(e1.pack() + invalid.pack(), like=e1, world_size=2)
    assert not merged.valid and "1 of 2 ranks" in merged.invalid_reason
    with pytest.raises(ValueError, match="same blocks"):
        CurvatureEstimate.unpack(e1.pack()[:-1], like=e1, world_size=2)


# ---------------------------------------------------------------- block discovery


def test_discover_blocks_vit_resnet_convnext_and_mlp() -> None:
    vit = make_vit()
    groups = discover_blocks(vit)
    assert list(groups) == ["stem", "blocks.0", "blocks.1", "head"]
    assert groups["stem"] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert groups["head"] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert all(n.startswith("blocks.1.") for n in groups["blocks.1"])
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    groups = discover_blocks(resnet)
    assert "layer2.0" in groups and groups["head"] == ["fc.weight", "fc.bias"]
    assert all(n.startswith(("conv1", "bn1")) for n in groups["stem"])
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    groups = discover_blocks(convnext)
    assert "stages.1.blocks.0" in groups
    assert any(n.startswith("stages.1.downsample") for n in groups["other"])
    covered = [n for members in groups.values() for n in members]
    assert sorted(covered) == sorted(n for n, _ in convnext.named_parameters())
    assert list(discover_blocks(make_mlp())) == ["0", "3"]


def test_explicit_blocks_are_validated() -> None:
    model = make_mlp()
    groups = resolve_blocks(model, {"first": ["0"], "last_w": ["3.weight"]})
    assert groups == {"first": ["0.weight", "0.bias"], "last_w": ["3.weight"]}
    assert resolve_blocks(model, ["0", "3"]) == {"0": ["0.weight", "0.bias"], "3": ["3.weight", "3.bias"]}
    with pytest.raises(ValueError, match=r"'3\.wieght' is neither.*3\.weight"):
        resolve_blocks(model, {"x": ["3.wieght"]})
    with pytest.raises(ValueError, match="reserved"):
        resolve_blocks(model, {"model": ["0"]})
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        resolve_blocks(model, {"x": ["0.bias"]})
    with pytest.raises(ValueError, match="no trainable"):
        resolve_blocks(model, {"x": ["1"]})
    est = estimate_curvature(model, ce_loss, batches_for("mlp"), blocks={"w": ["3.weight"]}, num_probes=2)
    assert est.num_params == {"w": 18}


# ---------------------------------------------------------------- splitting matrices


def brute_force_splitting(net: nn.Module, batches: list) -> torch.Tensor:
    """lambda_min of S_i = mean_b sum_s dL_b/da_si tanh''(z_si) h_s h_s^T, one neuron and one sample at a time."""
    out_dim, in_dim = net[0].out_features, net[0].in_features
    s = torch.zeros(out_dim, in_dim, in_dim, dtype=torch.float64)
    for x, y in batches:
        z = net[0](x)
        a = torch.tanh(z)
        (g,) = torch.autograd.grad(F.cross_entropy(net[3](net[2](a)).reshape(-1, 3), y.reshape(-1)), a)
        h, z, g = x.reshape(-1, in_dim).double(), z.reshape(-1, out_dim).double(), g.reshape(-1, out_dim).double()
        t = torch.tanh(z)
        second = -2 * t * (1 - t * t)
        for sample in range(h.shape[0]):
            for i in range(out_dim):
                s[i] += g[sample, i] * second[sample, i] * torch.outer(h[sample], h[sample])
    return torch.linalg.eigvalsh(s / len(batches))[:, 0]


def test_splitting_eigenvalues_match_brute_force() -> None:
    net = make_mlp()
    g = torch.Generator().manual_seed(4)
    # Tokens: inputs [batch, tokens, features]; every token is a sample of the neuron.
    batches = [(torch.randn(5, 3, 4, generator=g), torch.randint(0, 3, (5, 3), generator=g)) for _ in range(2)]

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        return F.cross_entropy(m(b[0]).reshape(-1, 3), b[1].reshape(-1))

    expected = brute_force_splitting(net, batches).float()
    explicit = splitting_eigenvalues(net, loss, batches, layers={"fc": (net[0], net[1])})["fc"]
    lanczos = splitting_eigenvalues(net, loss, batches, layers={"fc": ("0", "1")}, max_explicit_elements=0)["fc"]
    assert (expected.abs() > 1e-4).all()  # non-trivial: every neuron has curvature
    torch.testing.assert_close(explicit, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lanczos, expected, rtol=1e-4, atol=1e-6)


def test_splitting_defaults_to_timm_mlp_fc1() -> None:
    vit = make_vit()
    lam = splitting_eigenvalues(vit, ce_loss, batches_for("vit"))
    assert list(lam) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert lam["blocks.0.mlp.fc1"].shape == (16,) and torch.isfinite(lam["blocks.0.mlp.fc1"]).all()
    with pytest.raises(ValueError, match="layers="):
        splitting_eigenvalues(make_mlp(), ce_loss, batches_for("mlp"))
    assert math.isfinite(float(lam["blocks.1.mlp.fc1"].min()))


# ---------------------------------------------------------------- opt-in deflation (Hutch++-style)


def test_deflated_hutchinson_is_unbiased_and_cuts_the_error_when_a_few_eigenvalues_dominate() -> None:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    values = torch.cat([torch.tensor([100.0, 80, 60, 50, -40, 30]), 0.5 * torch.randn(294, generator=g)])
    a = ((q * values.double()) @ q.T).float()
    op = DenseOperator(a, [(100,), (150,), (50,)])
    blocks = {"a": [0], "b": [1], "c": [2]}
    exact = {"a": a[:100, :100].trace().item(), "b": a[100:250, 100:250].trace().item(), "c": a[250:, 250:].trace()}
    plain = hutchinson_trace(op, blocks, 64, generator=torch.Generator().manual_seed(1))
    deflated = hutchinson_trace(op, blocks, 64, generator=torch.Generator().manual_seed(1), deflation_rank=8)
    for b in blocks:
        assert abs(deflated[b].mean - float(exact[b])) <= 4 * deflated[b].stderr
        assert deflated[b].stderr < 0.2 * plain[b].stderr and deflated[b].num_probes == 64
    # A sketch as large as the space (rank-deficient Gram matrix) leaves nothing to estimate: exact.
    small = DenseOperator(random_symmetric(5, 3).float(), [(2,), (3,)])
    full = hutchinson_trace(small, {"x": [0], "y": [1]}, 4, deflation_rank=8, chunk_size=3)
    assert full["x"].mean == pytest.approx(small.matrix[:2, :2].trace().item(), abs=1e-4)
    assert full["y"].stderr == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="deflation_rank"):
        hutchinson_trace(small, None, 4, deflation_rank=-1)


def test_deflated_estimate_on_a_model_matches_the_exact_hessian() -> None:
    model = make_mlp().train()
    batches = batches_for("mlp")
    est = estimate_curvature(model, ce_loss, batches, num_probes=32, deflation_rank=4)
    groups = resolve_blocks(model, None)
    names = [n for members in groups.values() for n in members]
    h = exact_hessian(model, batches, names)
    for b, idx in block_slices(names, groups, model).items():
        exact = h[idx][:, idx].diagonal().sum().item()
        assert abs(est.traces[b].mean - exact) <= 4 * est.traces[b].stderr + 1e-5, (b, est.traces[b], exact)
