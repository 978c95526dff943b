"""Cost measurement against hand-computed FLOP and parameter counts."""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
from _helpers import TinyGPT
from torch import nn

from lightning_depthgrow import UnsupportedModelError
from lightning_depthgrow.measure import architecture_summary, block_costs, count_flops, count_parameters
from lightning_depthgrow.surgery import insert_identity_block

torch.set_num_threads(1)


def test_linear_flops_are_two_times_in_out_batch():
    report = count_flops(nn.Linear(7, 3), torch.randn(5, 7))
    assert report.total == 2 * 7 * 3 * 5
    assert report.per_module == {"": 2 * 7 * 3 * 5}


def test_mlp_flops_per_module():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = count_flops(mlp, torch.randn(5, 8))
    assert report.per_module["0"] == 2 * 8 * 16 * 5
    assert report.per_module["2"] == 2 * 16 * 4 * 5
    assert report.total == report.per_module[""] == 2 * 5 * (8 * 16 + 16 * 4)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_tuple_and_dict_inputs():
    model, x, y = TwoInputs(), torch.randn(3, 4), torch.randn(3, 6)
    expected = 2 * 3 * (4 * 2 + 6 * 2)
    assert count_flops(model, (x, y)).total == expected
    assert count_flops(model, {"x": x, "y": y}).total == expected


def test_attention_flops_are_counted_and_modes_restored():
    batch, length, dim = 2, 12, 32
    model = TinyGPT(vocab_size=32, context=16, dim=dim, depth=2, num_heads=2)
    model.train()
    model.blocks[1].eval()
    idx = torch.randint(0, 32, (batch, length))
    costs = block_costs(model, idx)

    linear = 2 * batch * length * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)
    attention = 2 * 2 * batch * length * length * dim  # q @ k^T and attn @ v, over all heads
    assert costs["blocks.0"] == {"flops": linear + attention, "params": count_parameters(model.blocks[0])}
    assert costs["blocks.1"] == costs["blocks.0"]
    assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert torch.is_grad_enabled()


def test_count_flops_runs_in_eval_mode_without_touching_batchnorm_statistics():
    model = timm.create_model("resnet18", pretrained=False, channels=(8, 16, 32, 64), stem_width=8, num_classes=5)
    model.train()
    state = copy.deepcopy(model.state_dict())
    count_flops(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_block_costs_add_up_and_track_growth():
    model = timm.create_model("resnet26", pretrained=False, channels=(8, 16, 32, 64), stem_width=8, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    report = count_flops(model, x)
    costs = block_costs(model, x)
    assert list(costs) == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    for stage in range(1, 5):
        blocks = [c for name, c in costs.items() if name.startswith(f"layer{stage}.")]
        assert sum(c["flops"] for c in blocks) == report.per_module[f"layer{stage}"]
        assert sum(c["params"] for c in blocks) == count_parameters(model.get_submodule(f"layer{stage}"))
    assert sum(c["flops"] for c in costs.values()) < report.total

    insert_identity_block(model, "layer3", 1, seed=0)
    grown = block_costs(model, x)
    assert grown["layer3.2"] == costs["layer3.1"] == grown["layer3.1"]
    assert count_flops(model, x).total == report.total + costs["layer3.1"]["flops"]


def test_architecture_summary_and_parameter_counts():
    model = TinyGPT(vocab_size=32, context=16, dim=32, depth=2, num_heads=2)
    model.head.weight.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    summary = architecture_summary(model)
    assert summary == {
        "depth": {"blocks": 2},
        "total_depth": 2,
        "params": total,
        "trainable_params": total - 32 * 32,
    }
    insert_identity_block(model, "blocks", 1, seed=0)
    grown = architecture_summary(model)
    assert grown["depth"] == {"blocks": 3}
    assert grown["params"] == total + count_parameters(model.blocks[0])

    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert count_parameters(tied) == 9 + 3 + 3


def test_block_costs_without_stack_says_so():
    with pytest.raises(UnsupportedModelError, match="No stack of registered residual blocks"):
        block_costs(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    assert architecture_summary(nn.Linear(2, 2))["depth"] == {}


def test_count_flops_ignores_models_running_in_other_threads():
    """Another thread's forward passes (a second fit in the same process) must not leak into the per-module
    counts: torch's own module tracker hooks every thread's modules, and the DMS resource model subtracts
    children from parents, so a leaked name made a wrong FLOPs model (found with two fits in threads)."""

    def make() -> nn.Module:
        return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(3)])

    busy, counted = make(), make()
    x = torch.randn(4, 16)
    alone = count_flops(counted, x)
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        with torch.no_grad():
            while not stop.is_set():
                busy(x)
                started.set()

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        started.wait(10)
        reports = [count_flops(counted, x) for _ in range(20)]
    finally:
        stop.set()
        thread.join()
    for report in reports:
        assert report.total == alone.total
        assert report.per_module == alone.per_module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in counted.modules())  # nothing left behind
