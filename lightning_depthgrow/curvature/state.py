"""Leave no trace: save and restore a model's state around a curvature estimate, and run it in fp32.

An estimate runs extra forward and backward passes through the training model. Those passes must not
change what training sees afterwards: no running-stat update in BatchNorm, no module left in the wrong
mode, no gradient overwritten or left attached to a graph, no RNG draw that shifts the next dropout
mask. :func:`preserve_model_state` guarantees that; :func:`estimation_mode` sets up the numerics
(fp32, no autocast, the math attention kernel, gradients enabled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode


class TwiceDifferentiable(TorchFunctionMode):
    """Compute ``F.hardsigmoid`` as ``relu6(x + 3) / 6``: bitwise the same values, and twice differentiable.

    torch implements no derivative for ``hardsigmoid_backward``, so a Hessian-vector product through a model with
    a hard-sigmoid gate (MobileNetV3's squeeze-excitation, timm and torchvision alike) fails. The composition is the
    same piecewise-linear function (its second derivative is zero wherever it exists, as for ReLU) and produces the
    same float32/float64 values (checked on a million random inputs in the tests), so the curvature is that of the
    user's own model. Entered by :func:`estimation_mode` only for models that hold an ``nn.Hardsigmoid``.

    Example:
        >>> x = torch.linspace(-5, 5, 11, requires_grad=True)
        >>> with TwiceDifferentiable():
        ...     y = F.hardsigmoid(x)
        ...     (g,) = torch.autograd.grad((y * x).sum(), x, create_graph=True)
        ...     (h,) = torch.autograd.grad(g.sum(), x)
        >>> torch.equal(y, F.hardsigmoid(x)), h[5].item()
        (True, 0.3333333432674408)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            x = args[0]
            out = F.relu6(x + 3) / 6
            return x.copy_(out) if (kwargs.get("inplace") or (len(args) > 1 and args[1])) else out
        return func(*args, **kwargs)


@dataclass
class _SavedState:
    modes: list[tuple[nn.Module, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor | None]]
    params: list[tuple[nn.Parameter, torch.Tensor]]
    buffers: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]]
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None


def _save(model: nn.Module, parameters: bool) -> _SavedState:
    modes = [(m, m.training) for m in model.modules()]
    # Keep the grad object itself (identity) and a copy of its values (in case something writes into it).
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    params = [(p, p.detach().clone()) for p in model.parameters()] if parameters else []
    buffers = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            buffers.append((module, name, buf, None if buf is None else buf.detach().clone()))
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _SavedState(modes, grads, params, buffers, torch.get_rng_state(), cuda_rng)


@torch.no_grad()
def _restore(saved: _SavedState) -> None:
    for module, training in saved.modes:
        module.training = training
    for p, grad, values in saved.grads:
        if grad is not None:
            grad.copy_(values)
        p.grad = grad
    for p, values in saved.params:
        p.copy_(values)
    for module, name, buf, values in saved.buffers:
        # Re-attach the original object (a forward may have swapped it) and put its values back.
        if buf is not None:
            buf.copy_(values)
        module._buffers[name] = buf
    torch.set_rng_state(saved.cpu_rng)
    if saved.cuda_rng is not None:
        torch.cuda.set_rng_state_all(saved.cuda_rng)


@contextlib.contextmanager
def preserve_model_state(model: nn.Module, parameters: bool = True) -> Iterator[nn.Module]:
    """Restore ``model`` bitwise on exit: parameters, buffers, module modes, ``.grad``, torch/CUDA RNG.

    Everything is restored even if the body raises. ``.grad`` is restored by identity (a parameter whose
    ``.grad`` was ``None`` gets ``None`` back, no graph-attached gradient is left behind) and by value.

    Args:
        model: the module to protect.
        parameters: also copy parameter values and put them back. Costs one copy of the weights; pass
            ``False`` when the body only reads the parameters (as the estimators here do).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> before = net[1].running_mean.clone()
        >>> with preserve_model_state(net):
        ...     _ = net.eval()
        ...     net.train()(torch.randn(4, 2)).sum().backward()
        >>> net.training, net[0].weight.grad is None, torch.equal(net[1].running_mean, before)
        (True, True, True)
    """
    saved = _save(model, parameters)
    try:
        yield model
    finally:
        _restore(saved)


@contextlib.contextmanager
def estimation_mode(model: nn.Module) -> Iterator[None]:
    """Numerics for second-order passes: fp32, no autocast, math attention, grad on, BN stats frozen.

    * Autocast is disabled on every device type, so a model trained under bf16 autocast is
      differentiated twice in its own (fp32) parameter dtype.
    * Fused scaled-dot-product attention has no double backward (CPU flash kernel, CUDA flash and
      memory-efficient kernels); the math kernel computes the same function and supports it.
    * BatchNorm modules in train mode keep normalising with the batch statistics (so the loss is the
      training loss) but stop updating their running statistics: ``track_running_stats`` is switched
      off for the duration. torch.func rejects the in-place update anyway, and restoring buffers
      afterwards alone would not be enough for the forward-over-reverse backend.
    * Gradients are enabled even when called from ``torch.no_grad`` or ``torch.inference_mode``.
    * A model with an ``nn.Hardsigmoid`` (no second derivative in torch) computes it as the bitwise-equal
      ``relu6(x + 3) / 6`` (:class:`TwiceDifferentiable`).
    """
    batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for bn in batchnorms:
        bn.track_running_stats = False
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            if any(isinstance(m, nn.Hardsigmoid) for m in model.modules()):
                stack.enter_context(TwiceDifferentiable())
            yield
    finally:
        for bn in batchnorms:
            bn.track_running_stats = True
