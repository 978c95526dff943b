"""The DMS search step: what it computes is pinned, and its shortcuts equal the plain computations.

A DMS search inside ``Trainer.fit`` computes what it computed before the per-step work was made cheaper.

Each case runs a short seeded search (real Trainer, real timm models, the callback's own hooks) and records the
loss, every gate's ratio and importances after every training batch, the ratios' gradients (task plus resource
loss) before every optimizer step, and at the end the export's kept elements and the exported model's logits on
a fixed input. ``tests/data/dms_search_pin.json`` holds the same records written by the tree before the
step-cost work (commit e8862ce); the two must agree to float tolerance, so a faster hot path (cached masks and
ranks, the closed-form resource gradient, the fused architecture step) cannot change what the search finds.

Regenerate the records only for a change that is *meant* to alter the search:
``PYTHONPATH=$PWD python tests/test_dms_step.py --write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Classifier, ImageClassifier, make_vit, quiet_trainer
from timm.models.resnet import BasicBlock, ResNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import GateBank, ResourceModel, TopKGate, attach_gates, find_gates, update_importance

PIN = Path(__file__).resolve().parent / "data" / "dms_search_pin.json"
CASES = ("vit", "vit_accumulate_2", "resnet")


class Recorder(pl.Callback):
    """Loss, ratios and importances of every gate after every training batch (while the gates are on)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.grads: list[list[float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        gates = find_gates(pl_module)  # after DMS's own hook (earlier in the list): task + resource gradient
        if gates is not None:
            self.grads.append([float(g.ratio.grad) for g in gates.gate_list()])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        gates = find_gates(pl_module)
        if gates is None:
            return
        self.steps.append(
            {
                "loss": float(outputs["loss"]),
                "ratios": [float(g.ratio) for g in gates.gate_list()],
                "importance": torch.cat([g.importance for g in gates.gate_list()]).tolist(),
            }
        )


def _data(shape: tuple[int, ...], n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def run_case(case: str) -> dict[str, Any]:
    """One seeded search (two epochs, export at the start of the third) and what it recorded."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    accumulate = 2 if case == "vit_accumulate_2" else 1
    if case.startswith("vit"):
        module: pl.LightningModule = Classifier(make_vit(depth=3, embed_dim=16, num_heads=2), max_epochs=3)
        shape: tuple[int, ...] = (1, 1, 40)
    else:
        net = ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=10)
        module, shape = ImageClassifier(net), (3, 16, 16)  # its stem and head: at least 0.85 of the FLOPs stay
    recorder = Recorder()
    target = 0.5 if case.startswith("vit") else 0.9
    dms = DifferentiableModelScaling(target=target, search_epochs=2, arch_lr=0.05, schedule_fraction=0.5)
    trainer = quiet_trainer(max_epochs=3, callbacks=[dms, recorder], accumulate_grad_batches=accumulate)
    trainer.fit(module, _data(shape, 96, seed=1))
    export = next(e for e in event_log(module) if e.kind == "dms_export")
    probe = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    module.eval()
    with torch.no_grad():
        logits = module(probe)
    return {
        "steps": recorder.steps,
        "ratio_grads": recorder.grads,
        "keep": export.spec["keep"],
        "logits": logits.flatten().tolist(),
    }


@pytest.mark.parametrize("case", CASES)
def test_search_records_match_the_pinned_search(case):
    expected = json.loads(PIN.read_text())[case]
    got = run_case(case)
    assert len(got["steps"]) == len(expected["steps"])
    for i, (g, e) in enumerate(zip(got["steps"], expected["steps"])):
        for key in ("loss", "ratios", "importance"):
            torch.testing.assert_close(
                torch.tensor(g[key], dtype=torch.float64),
                torch.tensor(e[key], dtype=torch.float64),
                rtol=1e-4,
                atol=1e-7,
                msg=lambda m, i=i, key=key: f"{case}, batch {i}, {key}: {m}",
            )
    torch.testing.assert_close(
        torch.tensor(got["ratio_grads"], dtype=torch.float64),
        torch.tensor(expected["ratio_grads"], dtype=torch.float64),
        rtol=1e-4,
        atol=1e-7,
    )
    assert got["keep"] == expected["keep"]
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(expected["logits"]), rtol=1e-4, atol=1e-5)


def _gated(family: str) -> tuple[torch.nn.Module, Any, ResourceModel, torch.Tensor]:
    torch.manual_seed(0)
    if family == "vit":
        model, example = make_vit(depth=3, embed_dim=16, num_heads=2), torch.zeros(2, 1, 1, 40)
    else:
        net = ResNet(BasicBlock, [1, 2, 1, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=10)
        model, example = net, torch.zeros(2, 3, 16, 16)
    gates = attach_gates(model)
    res = ResourceModel.build(model, example)
    gen = torch.Generator().manual_seed(1)
    gate_list = gates.gate_list()
    with torch.no_grad():
        for i, g in enumerate(gate_list[1:]):  # the first gate stays all-equal (mask 1, gradient all the same)
            g.importance.copy_(torch.rand(g.n, generator=gen))
            g.ratio.fill_([0.0, 0.3, 2.0, -0.5, 0.45][i % 5])  # at, inside and beyond the clamp's bounds
        gate_list[0].ratio.fill_(0.4)
    return model, gates, res, example


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("forward_first", [False, True])
def test_closed_form_resource_gradient_equals_autograd(family, forward_first):
    """count_and_mask_gradient + ratio_gradient: the straight-through count's value and autograd's ratio gradient."""
    model, gates, res, example = _gated(family)
    model.train()
    if forward_first:  # the forward pass's cached soft mask is what the search step reuses
        model(example)
    for resource in ("flops", "params"):
        count, mask_grad = res.count_and_mask_gradient(gates, resource)
        straight = res.evaluate(gates, resource)
        assert float(count) == float(straight) == float(res.evaluate(gates, resource, hard=True))
        ratios = gates.arch_parameters()
        auto = torch.autograd.grad(straight, ratios, retain_graph=True, allow_unused=True)
        auto = torch.stack([torch.zeros(()) if g is None else g for g in auto])
        closed = gates.bank.ratio_gradient(mask_grad)
        assert auto.abs().max() > 0
        torch.testing.assert_close(closed, auto, rtol=1e-5, atol=1e-7 * float(auto.abs().max()))


def test_cached_masks_follow_every_change_of_ratios_and_importances():
    """Evaluation masks are cached per state: an in-place ratio step, new importances, a state load all show."""
    model, gates, _, _ = _gated("vit")
    model.eval()
    before = [m.clone() for m in gates.masks()]
    gate = gates.gate_list()[1]
    with torch.no_grad():
        gate.ratio.add_(0.3)
    after = gates.masks()
    assert not torch.equal(after[1], before[1]) and int(after[1].sum()) < int(before[1].sum())
    state = {k: v.clone() for k, v in gates.state_dict().items()}
    with torch.no_grad():
        gate.importance.copy_(gate.importance.flip(0))
    assert not torch.equal(gates.masks()[1], after[1])
    gates.load_state_dict(state)
    assert torch.equal(gates.masks()[1], after[1])
    model.train()
    soft = gates.masks()
    assert soft[1].requires_grad and torch.equal((soft[1] >= 0.5).float(), after[1])


def test_pending_sums_a_gate_used_alone_and_through_its_bank():
    """dL/dm reaches the importance update whether a gate's mask came from its own bank or from the model's."""
    a, b = TopKGate(3, "width").train(), TopKGate(2, "depth").train()
    bank = GateBank([a, b])
    (a.mask() * torch.tensor([1.0, 2.0, 3.0])).sum().backward()  # a on its own
    parts = bank.masks()
    (parts[0].sum() + 5 * parts[1].sum()).backward()  # both through the bank
    parts = bank.masks()
    (2 * parts[0].sum()).backward()  # and again (gradient accumulation)
    assert torch.equal(bank.take_pending(), torch.tensor([4.0, 5.0, 6.0, 5.0, 5.0]))
    assert torch.equal(bank.take_pending(), torch.zeros(5))
    parts = bank.masks()
    (parts[0] * torch.tensor([1.0, 0.0, 2.0])).sum().backward()
    assert update_importance(bank)
    torch.testing.assert_close(a.importance, 0.01 * torch.tensor([1.0, 0.0, 4.0]))
    assert torch.equal(b.importance, torch.zeros(2))


def test_soft_mask_holds_no_denormal_values_and_keeps_its_gradient():
    """Mask values too small to matter are 0 in the forward pass (no denormal arithmetic downstream), while the
    ratio's gradient is still the sigmoid's."""
    gate = TopKGate(768, "width").train()  # the paper's lambda = N: values below 1e-19 within 0.06 of a
    with torch.no_grad():
        gate.importance.copy_(torch.arange(768, dtype=torch.float32))
        gate.ratio.fill_(0.3)
    floor = torch.finfo(torch.float32).tiny ** 0.5
    mask = gate.mask()
    assert ((mask == 0) | (mask >= floor)).all() and (mask == 0).any() and (mask > 0.5).any()
    weight = torch.linspace(-1.0, 1.0, 768)
    (mask * weight).sum().backward()
    rank = (torch.arange(768, dtype=torch.float32) + 0.5) / 768
    ratio = gate.ratio.detach().clone().requires_grad_()
    (torch.sigmoid(768 * (rank - ratio)) * weight).sum().backward()
    torch.testing.assert_close(gate.ratio.grad, ratio.grad)
    raw = torch.sigmoid(768 * (rank - 0.3))
    torch.testing.assert_close(mask.detach(), torch.where(raw < floor, 0.0, raw), rtol=0, atol=0)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: PYTHONPATH=$PWD python tests/test_dms_step.py --write  (rewrites the pinned records)")
    PIN.parent.mkdir(exist_ok=True)
    PIN.write_text(json.dumps({case: run_case(case) for case in CASES}))
    print(f"wrote {PIN}")
