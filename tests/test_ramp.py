"""Residual ramps: identity at birth for any block, schedule, exact fold, state_dict, deepcopy and pickle."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_depthgrow.surgery.ramp import (
    RAMP_BUFFER,
    advance_ramps,
    attach_ramp,
    fold_ramps,
    is_ramped,
    ramp_state,
    ramp_weight,
    ramped_blocks,
    remove_ramp,
)


class PostNormBlock(nn.Module):
    """``LN(x + mlp(x))``: zeroing the MLP leaves ``LN(x) != x``, so zero-init cannot make it an identity."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class GeluEndBlock(nn.Module):
    """A residual block ending in a non-ReLU activation, ``gelu(x + f(x))``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.fc(x))


@pytest.mark.parametrize("block_type", [PostNormBlock, GeluEndBlock])
def test_ramped_block_is_exactly_the_identity_at_birth(block_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    block = block_type()
    x = torch.randn(3, 5, 8)
    assert not torch.allclose(block(x), x)  # the block itself is far from the identity
    attach_ramp(block, steps=4)
    assert torch.equal(block(x), x)
    net = nn.Sequential(nn.Linear(8, 8), block, nn.Linear(8, 3))
    reference = nn.Sequential(net[0], net[2])
    assert torch.equal(net(x), reference(x))


def test_schedule_rises_linearly_ends_at_one_and_reports_the_end_once() -> None:
    block = PostNormBlock()
    attach_ramp(block, steps=3)
    weights, finished = [ramp_weight(block)], []
    for _ in range(5):
        finished.append(advance_ramps(block))
        weights.append(ramp_weight(block))
    assert weights == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert finished == [[], [], [""], [], []]
    assert ramp_state(block) == (3, 3)
    assert advance_ramps(block, steps=0) == []


def test_intermediate_weight_blends_input_and_block_output() -> None:
    torch.manual_seed(1)
    block = PostNormBlock()
    x = torch.randn(4, 8)
    plain = block(x)
    attach_ramp(block, steps=4)
    advance_ramps(block)
    torch.testing.assert_close(block(x), x + 0.25 * (plain - x))


def test_ended_ramp_returns_block_output_bitwise_and_fold_leaves_no_trace() -> None:
    torch.manual_seed(2)
    block = PostNormBlock()
    x = torch.randn(4, 8)
    plain = block(x)
    keys = list(block.state_dict())
    attach_ramp(block, steps=2)
    assert RAMP_BUFFER in block.state_dict()
    advance_ramps(block, steps=2)
    assert torch.equal(block(x), plain)
    assert fold_ramps(block) == [""]
    assert not is_ramped(block) and not block._forward_hooks
    assert list(block.state_dict()) == keys
    assert torch.equal(block(x), plain)
    assert torch.equal(pickle.loads(pickle.dumps(block))(x), plain)


def test_fold_only_touches_ended_ramps_unless_named() -> None:
    net = nn.Sequential(PostNormBlock(), PostNormBlock())
    attach_ramp(net[0], steps=1)
    attach_ramp(net[1], steps=5)
    advance_ramps(net)
    assert ramped_blocks(net) == {"0": (1, 1), "1": (1, 5)}
    assert fold_ramps(net) == ["0"]
    assert ramped_blocks(net) == {"1": (1, 5)}
    assert fold_ramps(net, ["1"]) == ["1"]  # replay of a recorded fold: whatever the state
    assert ramped_blocks(net) == {}
    with pytest.raises(ValueError, match="no ramped module"):
        fold_ramps(net, ["0"])


def test_state_dict_round_trip_mid_ramp() -> None:
    torch.manual_seed(3)
    block = PostNormBlock()
    attach_ramp(block, steps=10)
    advance_ramps(block, steps=3)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    fresh = PostNormBlock()
    attach_ramp(fresh, steps=10)  # what replaying the growth event rebuilds
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 8)
    assert ramp_state(fresh) == (3, 10)
    assert torch.equal(fresh(x), block(x))
    with pytest.raises(RuntimeError, match=RAMP_BUFFER):
        PostNormBlock().load_state_dict(block.state_dict())  # a model without the ramp does not fit


def test_deepcopy_and_pickle_mid_ramp_are_independent_and_equal() -> None:
    torch.manual_seed(4)
    block = PostNormBlock()
    attach_ramp(block, steps=4)
    advance_ramps(block)
    x = torch.randn(2, 8)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert torch.equal(clone(x), block(x))
        advance_ramps(clone)
        assert ramp_state(clone) == (2, 4) and ramp_state(block) == (1, 4)
        remove_ramp(clone)
        assert is_ramped(block)


def test_ramp_survives_dtype_casts_and_keeps_identity_in_bfloat16() -> None:
    block = PostNormBlock().to(torch.bfloat16)
    attach_ramp(block, steps=2)
    block.to(torch.float64).to(torch.bfloat16)
    assert block._buffers[RAMP_BUFFER].dtype == torch.int64
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(block(x), x)


def test_gradients_reach_the_block_only_once_the_ramp_has_started() -> None:
    torch.manual_seed(5)
    block = PostNormBlock()
    attach_ramp(block, steps=2)
    x = torch.randn(3, 8)
    block(x).sum().backward()
    assert all(not p.grad.any() for p in block.parameters())
    block.zero_grad()
    advance_ramps(block)
    block(x).square().sum().backward()
    assert block.fc1.weight.grad.abs().sum() > 0


def test_bad_arguments_are_refused() -> None:
    block = PostNormBlock()
    with pytest.raises(TypeError, match="steps"):
        attach_ramp(block, steps=True)
    with pytest.raises(TypeError, match="steps"):
        attach_ramp(block, steps=2.0)
    with pytest.raises(ValueError, match="steps"):
        attach_ramp(block, steps=0)
    assert not is_ramped(block) and not block._forward_hooks
    attach_ramp(block, steps=2)
    with pytest.raises(ValueError, match="already carries a ramp"):
        attach_ramp(block, steps=3)
    with pytest.raises(ValueError, match="carries no ramp"):
        remove_ramp(nn.Linear(2, 2))


def test_shape_changing_module_is_refused_at_forward() -> None:
    layer = nn.Linear(4, 3)
    attach_ramp(layer, steps=2)
    with pytest.raises(RuntimeError, match="shape-preserving"):
        layer(torch.randn(2, 4))
