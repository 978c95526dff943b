"""Depth per neuron (Guna, Chavan & Gupta 2024): give selected output neurons of a Linear a residual sub-unit.

For an ``nn.Linear`` computing ``o = W x + b`` and a set ``S`` of its output neurons,
:func:`add_neuron_branch` makes it compute

    ``o = W x + b;  o[..., S] += u + gelu(u),  u = W_A x + b_A``

with ``W_A, b_A = 0`` at birth, so ``u = 0``, ``u + gelu(u) = 0`` and the model computes exactly the same
function right after growth. Training then moves ``W_A`` away from zero (its gradient at birth is
``(1 + gelu'(0)) * dL/do_S x^T = 1.5 dL/do_S x^T``, non-zero) and the selected neurons gain a nonlinear
sub-layer: their depth grows, the others' does not.

The Linear is replaced by a :class:`BranchedLinear` that *reuses* its ``weight`` and ``bias`` Parameter
objects (identity kept, so optimizer state, weight-decay groups and state-dict keys ``<path>.weight`` /
``<path>.bias`` stay as they were) and holds the sub-units in ``<path>.branches.<k>``. Each sub-unit's
projection ``<path>.branches.<k>.proj`` is an ordinary ``nn.Linear`` (followed by the activation module
``<path>.branches.<k>.act``), so it can be selected in turn: its neurons then nest one level deeper. Selecting a
Linear that already has branches adds another branch (never resizes an existing one, so no parameter is
replaced and no optimizer state has to be padded).

Registered as the ``"neuron_branch"`` event kind with spec ``{"linear": path, "neurons": [...]}``; replaying
the same events on the same starting model rebuilds the same structure (and, with zeros at birth, the same
weights).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..events import AppliedChange, register_event_kind

# Hook dictionaries carried over from the replaced Linear: hooks users put on ``fc1`` keep firing on ``fc1``
# (their RemovableHandles point at these dict objects, so removing them later still works).
_CARRIED_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class ResidualGELU(nn.Module):
    """``u + gelu(u)``: the activation of a neuron branch (zero at ``u = 0``, slope 1.5 there).

    A module (not a function) so that hooks, e.g. the splitting-eigenvalue estimator's, can read its output.

    Example:
        >>> ResidualGELU()(torch.zeros(2))
        tensor([0., 0.])
    """

    def forward(self, u: Tensor) -> Tensor:
        return u + F.gelu(u)


class NeuronBranch(nn.Module):
    """One residual sub-unit ``u + gelu(u)``, ``u = proj(x)``, added onto output neurons ``neurons`` of a Linear.

    Args:
        in_features: the parent Linear's input size.
        neurons: indices of the parent's output neurons this branch adds to (distinct).
        bias: whether ``proj`` has a bias (the parent's choice is mirrored).
        device, dtype: where ``proj`` lives.

    ``proj`` starts at zero and is created without drawing random numbers.

    Example:
        >>> branch = NeuronBranch(3, [0, 2])
        >>> branch.proj.weight.shape, branch.neurons.tolist()
        (torch.Size([2, 3]), [0, 2])
    """

    def __init__(
        self,
        in_features: int,
        neurons: Sequence[int],
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # skip_init builds on the meta device and materialises uninitialised memory: no RNG draw.
        self.proj = torch.nn.utils.skip_init(
            nn.Linear, in_features, len(neurons), bias=bias, device=device, dtype=dtype
        )
        with torch.no_grad():
            self.proj.weight.zero_()
            if self.proj.bias is not None:
                self.proj.bias.zero_()
        self.act = ResidualGELU()
        # Not persistent: the event spec is the record of which neurons; replay rebuilds it.
        self.register_buffer("neurons", torch.tensor(list(neurons), dtype=torch.long, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """The branch's contribution, shaped ``[..., len(neurons)]``."""
        return self.act(self.proj(x))

    def extra_repr(self) -> str:
        return f"neurons={self.neurons.tolist()}"


class BranchedLinear(nn.Linear):
    """An ``nn.Linear`` whose selected output neurons carry residual sub-units (:class:`NeuronBranch`).

    Built from an existing Linear by :func:`add_neuron_branch`; shares that Linear's ``weight`` and ``bias``
    Parameter objects. It is still an ``nn.Linear`` (same ``in_features``/``out_features``, same state-dict keys
    for its own weights), so code that looks layers up by type, such as the splitting-eigenvalue estimator,
    keeps finding it; its output includes the branches.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> branched = BranchedLinear(lin)
        >>> branched.weight is lin.weight, len(branched.branches)
        (True, 0)
    """

    def __init__(self, linear: nn.Linear) -> None:
        # nn.Linear.__init__ would allocate and randomly initialise new weights; adopt the given ones instead.
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        self.branches = nn.ModuleList()
        self.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        for branch in self.branches:
            # Out of place and with distinct indices per branch: deterministic, and exact (adding zeros) at birth.
            out = out.index_add(-1, branch.neurons, branch(x).to(out.dtype))
        return out


def add_neuron_branch(
    model: nn.Module, linear_path: str, neurons: Sequence[int], seed: int | None = None
) -> AppliedChange:
    """Add a zero-initialised residual sub-unit to output neurons ``neurons`` of the Linear at ``linear_path``.

    The model's function is unchanged (bitwise: the branch adds exact zeros). A plain ``nn.Linear`` is replaced
    in place by a :class:`BranchedLinear` reusing its parameters; a :class:`BranchedLinear` gets one more
    branch. The new branch is ``<linear_path>.branches.<k>``; its projection ``<linear_path>.branches.<k>.proj``
    is itself a Linear that can be passed here later (deeper nesting).

    Args:
        model: the model to grow, in place.
        linear_path: dotted name of an ``nn.Linear`` (or :class:`BranchedLinear`) inside ``model``.
        neurons: distinct output-neuron indices in ``0..out_features-1``.
        seed: reserved for initialisations that draw random numbers. The branch starts at zero, which needs
            none, so the global RNG is never touched and the result does not depend on ``seed``.

    Returns:
        An :class:`~lightning_depthgrow.events.AppliedChange` pairing the branch's weight with the Linear's
        weight and its bias with the Linear's bias, so each joins the twin's optimizer param group.

    Raises:
        ValueError: ``linear_path`` is empty or names no module, or ``neurons`` is empty, has duplicates or
            values out of range.
        TypeError: the module at ``linear_path`` is not exactly an ``nn.Linear`` or :class:`BranchedLinear`
            (subclasses such as attention's ``out_proj`` are often used through their weight only, where a
            branch would be silently ignored), is parametrized, or an index is not an int.

    Everything is validated before the model is touched: on error the model is unchanged.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> before = net(x)
        >>> change = add_neuron_branch(net, "0", [1, 3])
        >>> torch.equal(net(x), before), type(net[0]).__name__, net[0].branches[0].proj.weight.shape
        (True, 'BranchedLinear', torch.Size([2, 3]))
        >>> _ = add_neuron_branch(net, "0.branches.0.proj", [0])  # neuron 1's sub-unit gets one of its own
        >>> torch.equal(net(x), before)
        True
    """
    del seed  # zeros at birth: no random initialisation to seed (kept in the signature and the event spec)
    parent, attr, linear = _resolve_linear(model, linear_path)
    indices = _checked_neurons(neurons, linear.out_features, linear_path)

    weight = linear.weight
    branch = NeuronBranch(
        linear.in_features, indices, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype
    )
    branch.train(linear.training)
    branch.proj.weight.requires_grad_(linear.weight.requires_grad)
    added: list[tuple[nn.Parameter, nn.Parameter | None]] = [(branch.proj.weight, linear.weight)]
    if linear.bias is not None:
        branch.proj.bias.requires_grad_(linear.bias.requires_grad)
        added.append((branch.proj.bias, linear.bias))

    if type(linear) is nn.Linear:
        branched = BranchedLinear(linear)
        for name in _CARRIED_HOOKS:
            setattr(branched, name, getattr(linear, name))
        setattr(parent, attr, branched)
        linear = branched
    linear.branches.append(branch)
    return AppliedChange(added=added)


def neuron_branches(model: nn.Module, linear_path: str) -> dict[str, str]:
    """Every branch projection nested under the Linear at ``linear_path``, mapped to its activation module.

    Returns ``{"<path>.branches.<k>.proj": "<path>.branches.<k>.act", ...}`` (recursively, outer branches first),
    i.e. the further Linears whose neurons :func:`add_neuron_branch` can nest deeper. Empty for a plain Linear.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4))
        >>> _ = add_neuron_branch(net, "0", [0])
        >>> neuron_branches(net, "0")
        {'0.branches.0.proj': '0.branches.0.act'}
    """
    found: dict[str, str] = {}
    module = model.get_submodule(linear_path)
    if isinstance(module, BranchedLinear):
        for k in range(len(module.branches)):
            proj = f"{linear_path}.branches.{k}.proj"
            found[proj] = f"{linear_path}.branches.{k}.act"
            found.update(neuron_branches(model, proj))
    return found


def _resolve_linear(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Linear]:
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"linear_path must be the dotted name of an nn.Linear inside the model (e.g. 'blocks.0.mlp.fc1'), got "
            f"{path!r}; the model itself cannot be replaced in place."
        )
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"No module at {path!r} in {type(model).__name__}: {err}") from err
    if type(module) not in (nn.Linear, BranchedLinear):
        raise TypeError(
            f"{path!r} is a {type(module).__name__}; add_neuron_branch needs exactly an nn.Linear (or a "
            "BranchedLinear it made). Subclasses may not compute their output through forward(), so a branch "
            "could be silently ignored."
        )
    if parametrize.is_parametrized(module):
        raise TypeError(
            f"{path!r} is parametrized (e.g. weight norm); remove the parametrization before adding a neuron branch."
        )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, attr, module


def _checked_neurons(neurons: Sequence[int], out_features: int, path: str) -> list[int]:
    if isinstance(neurons, (str, bytes)) or not isinstance(neurons, (Sequence, Tensor)):
        raise TypeError(f"neurons must be a sequence of ints, got {type(neurons).__name__} {neurons!r}")
    values = neurons.tolist() if isinstance(neurons, Tensor) else list(neurons)
    indices = []
    for value in values:
        if isinstance(value, bool):
            raise TypeError(f"neurons must be ints, got the bool {value!r}")
        try:
            indices.append(operator.index(value))
        except TypeError as err:
            raise TypeError(f"neurons must be ints, got {type(value).__name__} {value!r}") from err
    if not indices:
        raise ValueError(f"neurons is empty; pass at least one output-neuron index of {path!r}.")
    bad = [i for i in indices if not 0 <= i < out_features]
    if bad:
        raise ValueError(
            f"neuron indices {bad[:8]} are out of range for {path!r} with {out_features} output neurons; valid "
            f"indices are 0..{out_features - 1}."
        )
    if len(set(indices)) != len(indices):
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"neurons has duplicates {duplicates[:8]}; each neuron can be selected once per branch.")
    return indices


def _apply_neuron_branch(model: nn.Module, spec: dict[str, Any]) -> AppliedChange:
    """Applier of ``"neuron_branch"`` events: ``{"linear": str, "neurons": [int, ...], "seed": int | None}``."""
    missing = [key for key in ("linear", "neurons") if key not in spec]
    if missing:
        raise ValueError(f"neuron_branch event spec {spec} lacks {missing}; it needs 'linear' and 'neurons'.")
    return add_neuron_branch(model, spec["linear"], spec["neurons"], seed=spec.get("seed"))


register_event_kind("neuron_branch", _apply_neuron_branch)
