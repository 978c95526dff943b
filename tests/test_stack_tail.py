"""Stacking a stage's shape-preserving tail (``stack_blocks(start=...)``, ``DepthGrowth(operator="stack")`` on
stages whose first block downsamples), on a real torchvision ResNet.

A ResNet stage ``[d, b1, b2]`` (``d`` downsamples) cannot be duplicated whole; its tail ``[b1, b2]`` can:
``[d, b1, b2] -> [d, b1, b2, b1', b2']`` (``order="stack"``) or ``[d, b1, b1', b2, b2']`` (``"interleave"``).
Checked: the copies are the tail's weights at the right positions, a ramped stacking is the identity at birth,
the event log's ``inserted_after`` names the copies' positions (what ``load_grown`` rebuilds from), and bad
``start`` values are refused with the model untouched.
"""

from __future__ import annotations

import pytest
import torch

from lightning_depthgrow.events import ArchitectureEvent, apply_event
from lightning_depthgrow.growth.depth import inserted_after
from lightning_depthgrow.surgery import stack_blocks
from lightning_depthgrow.surgery.ramp import advance_ramps, fold_ramps
from tests._helpers import tensor_hash

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402

torch.set_num_threads(1)


def _resnet() -> ResNet:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 3, 1, 1], num_classes=4).eval()  # layer2 = [downsampling, b1, b2]
    for module in model.modules():  # non-trivial batch-norm statistics, so a wrong copy shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("order", "sources", "kept_at"),
    [("stack", [0, 1, 2, 1, 2, 1, 2], [0, 1, 2]), ("interleave", [0, 1, 1, 1, 2, 2, 2], [0, 1, 4])],
)
def test_tail_stacking_copies_the_tail_in_order_and_is_the_identity_at_birth(
    order: str, sources: list[int], kept_at: list[int]
) -> None:
    model = _resnet()
    before = model(X)
    originals = list(model.layer2)
    new, _ = stack_blocks(model, "layer2", factor=3, order=order, ramp_steps=3, start=1)
    assert len(model.layer2) == 7 and len(new) == 4
    for position, source in enumerate(sources):
        block = model.layer2[position]
        # a ramped copy wraps the block; compare the copied conv weights with the source's
        assert torch.equal(dict(block.named_parameters())[_conv(block)], originals[source].conv1.weight)
    assert [model.layer2[p] for p in kept_at] == originals  # the originals stay where they were, in order
    torch.testing.assert_close(model(X), before, rtol=0, atol=1e-6)  # ramped: the identity at birth
    for _ in range(3):
        finished = advance_ramps(model)
    fold_ramps(model, finished)
    assert not torch.allclose(model(X), before, atol=1e-3)  # the copies now compute: a deeper stage


def _conv(block: torch.nn.Module) -> str:
    return next(name for name, _ in block.named_parameters() if name.endswith("conv1.weight"))


@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_inserted_after_of_a_tail_stacking_names_the_copies_positions(order: str) -> None:
    model = _resnet()
    before = {id(block) for block in model.layer2}
    event = ArchitectureEvent("stack_blocks", {"stack": "layer2", "factor": 3, "order": order, "start": 1})
    apply_event(model, event)
    new_positions = [i for i, block in enumerate(model.layer2) if id(block) not in before]
    # ``after`` indices: each copy sits right after the index recorded for it, in insertion order
    assert sorted(i + 1 for i in inserted_after([event], "layer2", depth=len(model.layer2))) == new_positions
    # a stacking that does not add up is flagged (a history starting_blocks rejects)
    assert inserted_after([event], "layer2", depth=len(model.layer2) + 1) == [-1]


def test_bad_start_is_refused_with_the_model_untouched() -> None:
    model = _resnet()
    state = tensor_hash(model)
    with pytest.raises(ValueError, match="no block from 3 on"):
        stack_blocks(model, "layer2", factor=2, start=3)
    with pytest.raises(Exception, match="changes the shape"):
        stack_blocks(model, "layer2", factor=2, start=0)  # the downsampling block cannot be copied after the tail
    assert len(model.layer2) == 3 and tensor_hash(model) == state
