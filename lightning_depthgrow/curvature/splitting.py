"""Splitting-matrix eigenvalues (Liu, Wu & Wang 2019, "Splitting steepest descent"), per output neuron.

For a Linear layer feeding an elementwise activation, output neuron ``i`` has pre-activation
``z_i = w_i . h`` (``h`` the layer input) and activation ``a_i = sigma(z_i)``. Its splitting matrix is

    ``S_i = sum_b sum_s  dL_b/da_{s,i} * sigma''(z_{s,i}) * h_s h_s^T  /  n_batches``

where ``s`` runs over every sample of batch ``b`` *and every token* (all leading dimensions of ``h``
are flattened into samples) and ``dL_b/da`` is the autograd gradient of ``L_b = loss_fn(model, batch_b)``.
When ``loss_fn`` averages a per-example loss over the batch (the usual ``reduction="mean"``),
``dL_b/da_s`` already carries the ``1/batch_size`` factor, so this is exactly the expectation over
examples ``E_x[dphi/da_i * sigma''(z_i) * h h^T]`` of the paper, the tokens of one example adding up
(they all feed that example's loss); for a loss averaged over tokens it is the mean over tokens. Its
minimum eigenvalue is what one split of neuron ``i`` (by ``+-eps`` along the eigenvector) lowers the
loss by, ``eps^2 / 2 * lambda_min``, to second order. The bias is not part of ``h``.

``S_i`` is formed explicitly as an ``[out, in, in]`` tensor when that is small; otherwise every neuron
of a layer runs batched Lanczos (full reorthogonalisation) with the matrix-free product
``S_i v = sum_s c_{s,i} h_s (h_s . v)``, ``c = dL/da * sigma''(z)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .hvp import LossFn, _clone_inference_tensors, check_loss
from .state import estimation_mode, preserve_model_state

LayerSpec = tuple[nn.Linear | str, nn.Module | str]


def _default_layers(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Module]]:
    try:
        from timm.layers import Mlp
    except ImportError:
        Mlp = None
    layers = {
        f"{name}.fc1" if name else "fc1": (m.fc1, m.act)
        for name, m in model.named_modules()
        if Mlp is not None and type(m) is Mlp and isinstance(m.fc1, nn.Linear)
    }
    if not layers:
        raise ValueError(
            f"No timm Mlp (fc1 -> act) found in {type(model).__name__}. Pass layers={{name: (linear, activation)}}"
            " with the Linear module and the activation module applied to its output (or their dotted names)."
        )
    return layers


def _resolve_layers(model: nn.Module, layers: Mapping[str, LayerSpec] | None) -> dict[str, tuple[nn.Linear, nn.Module]]:
    if layers is None:
        return _default_layers(model)
    resolved = {}
    for name, (linear, act) in layers.items():
        linear = model.get_submodule(linear) if isinstance(linear, str) else linear
        act = model.get_submodule(act) if isinstance(act, str) else act
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"layers[{name!r}]: expected an nn.Linear, got {type(linear).__name__}")
        if not isinstance(act, nn.Module):
            raise TypeError(
                f"layers[{name!r}]: the activation must be the nn.Module applied to the Linear's output (its output "
                f"is hooked to read dL/da), got {type(act).__name__}; use `activation=` to override sigma itself."
            )
        resolved[name] = (linear, act)
    return resolved


def _second_derivative(fn: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """Elementwise ``fn''(z)`` by double autograd (``fn`` must act elementwise)."""
    z = z.detach().requires_grad_(True)
    (first,) = torch.autograd.grad(fn(z).sum(), z, create_graph=True)
    if first.grad_fn is None:  # piecewise linear (ReLU): sigma'' = 0 almost everywhere
        return torch.zeros_like(z)
    (second,) = torch.autograd.grad(first.sum(), z)
    return second


def _min_eig_explicit(coef: Tensor, h: Tensor) -> Tensor:
    matrices = torch.einsum("so,si,sj->oij", coef, h, h)
    return torch.linalg.eigvalsh(matrices)[:, 0]


def _min_eig_lanczos(coef: Tensor, h: Tensor, iters: int, generator: torch.Generator) -> Tensor:
    """Batched Lanczos over all neurons: ``S_i v_i = sum_s coef[s,i] h_s (h_s . v_i)`` for V = [out, in]."""
    out_dim, in_dim = coef.shape[1], h.shape[1]
    m = min(iters, in_dim)

    def matvec(v: Tensor) -> Tensor:
        return ((h @ v.T) * coef).T @ h

    def orthonormal_start(basis: Tensor | None) -> Tensor:
        q = torch.randn(out_dim, in_dim, generator=generator, dtype=h.dtype).to(h.device)
        if basis is not None:
            for _ in range(2):
                q = q - torch.einsum("okd,ok->od", basis, torch.einsum("okd,od->ok", basis, q))
        return q / q.norm(dim=1, keepdim=True)

    q_basis = orthonormal_start(None).unsqueeze(1)
    alpha = torch.zeros(out_dim, m, dtype=h.dtype, device=h.device)
    beta = torch.zeros(out_dim, m, dtype=h.dtype, device=h.device)
    for j in range(m):
        q = q_basis[:, j]
        w = matvec(q)
        alpha[:, j] = (w * q).sum(1)
        # Full reorthogonalisation (twice) against the whole basis keeps the tridiagonal matrix exact.
        for _ in range(2):
            w = w - torch.einsum("okd,ok->od", q_basis, torch.einsum("okd,od->ok", q_basis, w))
        if j == m - 1:
            break
        norm = w.norm(dim=1)
        scale = alpha[:, : j + 1].abs().amax(1).clamp_min(torch.finfo(h.dtype).tiny)
        broke = norm <= 1e-10 * scale
        # An invariant subspace is exhausted: continue from a fresh orthogonal direction with zero coupling,
        # which keeps the eigenvalues of T those of S.
        restart = orthonormal_start(q_basis)
        nxt = torch.where(broke[:, None], restart, w / norm.clamp_min(torch.finfo(h.dtype).tiny)[:, None])
        beta[:, j] = torch.where(broke, torch.zeros_like(norm), norm)
        q_basis = torch.cat([q_basis, nxt.unsqueeze(1)], dim=1)
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
    return torch.linalg.eigvalsh(tri)[:, 0]


def splitting_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    layers: Mapping[str, LayerSpec] | None = None,
    activation: Callable[[Tensor], Tensor] | None = None,
    max_explicit_elements: int = 2**24,
    lanczos_iters: int = 48,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Minimum eigenvalue of each output neuron's splitting matrix ``S_i`` (see the module docstring).

    Args:
        model: the model; left bitwise unchanged (:func:`preserve_model_state`).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: the batches ``S_i`` averages over.
        layers: ``{name: (linear, act)}`` with the Linear and the activation module applied to its output
            (modules or dotted names). Default: every timm ``Mlp`` as ``"<path>.fc1": (fc1, act)``.
        activation: the elementwise ``sigma`` whose second derivative is used; default the ``act`` module.
        max_explicit_elements: form ``S`` explicitly when ``out * in * in`` is at most this (exact);
            otherwise batched Lanczos.
        lanczos_iters: Lanczos steps (capped at ``in``; exact when it reaches ``in``).
        seed: dropout masks (``torch.manual_seed(seed + b)`` before batch ``b``) and Lanczos start vectors.

    Returns:
        ``{name: tensor of shape [out_features]}`` (float32, on the layer's device). Negative entries mark
        neurons at a saddle; the most negative gain the most from splitting.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> lam = splitting_eigenvalues(net, loss_fn, data, layers={"fc": (net[0], net[1])})
        >>> lam["fc"].shape
        torch.Size([4])
    """
    chosen = _resolve_layers(model, layers)
    batches = [_clone_inference_tensors(b) for b in batches]
    if not batches:
        raise ValueError("batches is empty; pass at least one batch.")
    inputs: dict[str, list[Tensor]] = {n: [] for n in chosen}
    pre: dict[str, list[Tensor]] = {n: [] for n in chosen}
    post: dict[str, list[Tensor]] = {n: [] for n in chosen}
    coef: dict[str, list[Tensor]] = {n: [] for n in chosen}
    hs: dict[str, list[Tensor]] = {n: [] for n in chosen}

    def linear_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name].append(args[0].detach())
            pre[name].append(output.detach())

        return hook

    def act_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            post[name].append(output)

        return hook

    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    handles = []
    with torch.inference_mode(False), preserve_model_state(model, parameters=False), estimation_mode(model):
        try:
            for name, (linear, act) in chosen.items():
                handles.append(linear.register_forward_hook(linear_hook(name)))
                handles.append(act.register_forward_hook(act_hook(name)))
            for b, batch in enumerate(batches):
                with torch.random.fork_rng(devices=cuda_devices):
                    torch.manual_seed(seed + b)
                    loss = check_loss(loss_fn(model, batch))
                for name in chosen:
                    if len(pre[name]) != len(post[name]) or any(
                        z.shape != a.shape for z, a in zip(pre[name], post[name])
                    ):
                        raise ValueError(
                            f"Layer {name!r}: its activation module was not applied once to each output of the "
                            "Linear (calls or shapes differ); pass the activation that directly follows it."
                        )
                flat_post = [a for n in chosen for a in post[n]]
                grads = torch.autograd.grad(loss, flat_post, allow_unused=True)
                pos = 0
                for name, (_, act) in chosen.items():
                    sigma = activation if activation is not None else act
                    for h, z in zip(inputs[name], pre[name]):
                        g = grads[pos]
                        pos += 1
                        g = torch.zeros_like(z) if g is None else g
                        c = g.reshape(-1, z.shape[-1]) * _second_derivative(sigma, z).reshape(-1, z.shape[-1])
                        coef[name].append(c.float())
                        hs[name].append(h.reshape(-1, h.shape[-1]).float())
                    inputs[name].clear()
                    pre[name].clear()
                    post[name].clear()
                del loss, grads, flat_post
        finally:
            for handle in handles:
                handle.remove()

    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name in chosen:
        c = torch.cat(coef[name]) / len(batches)
        h = torch.cat(hs[name])
        out_dim, in_dim = c.shape[1], h.shape[1]
        if out_dim * in_dim * in_dim <= max_explicit_elements:
            result[name] = _min_eig_explicit(c, h)
        else:
            result[name] = _min_eig_lanczos(c, h, lanczos_iters, generator)
    return result
