"""After fit with a growth callback, the user's module holds nothing of ours but its plain-data event log.

``torch.save(module)``, ``copy.deepcopy(module)`` and ``pickle`` work, no hook or method is left on it, and its
``__dict__`` differs from a module fitted without our callbacks only by the event log (a list of
``ArchitectureEvent``: JSON-type fields, the module's architecture history).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from lightning_depthgrow.callbacks import CurvatureMonitor, DepthGrowth, NeuronGrowth
from lightning_depthgrow.events import LOG_ATTRIBUTE, ArchitectureEvent, event_log
from tests._helpers import HOOK_DICTS

GROWERS = {
    "depth-curvature": lambda: DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="curvature"),
    "depth-private-monitor": lambda: DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, curvature_monitor=CurvatureMonitor(num_probes=2, log=False)
    ),
    "depth-uniform": lambda: DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="uniform"),
    "neuron": lambda: NeuronGrowth(step_budget=0.05, warmup_epochs=1, scale_by_lr=False),
    # The default (ramped stacking), verified on an example input, and on the inputs recorded during fit.
    "depth-default": lambda: DepthGrowth(),
    "depth-default-no-example": lambda: DepthGrowth(),
}


def _fitted(make_module, loader, quiet_trainer, callbacks, tmp_path, example: bool = True) -> torch.nn.Module:
    module = make_module(max_epochs=2)
    if not example:
        module.example_input_array = None
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GROWERS))
def test_module_after_fit_pickles_copies_saves_and_holds_only_its_log(
    name, make_module, loader, quiet_trainer, tmp_path
):
    example = not name.endswith("-no-example")
    plain = _fitted(make_module, loader, quiet_trainer, [], tmp_path / "plain", example)
    grown = _fitted(make_module, loader, quiet_trainer, [GROWERS[name]()], tmp_path / "grown", example)
    log = event_log(grown)
    assert log and all(isinstance(e, ArchitectureEvent) for e in log), "the run must have grown"

    assert set(vars(grown)) - set(vars(plain)) == {LOG_ATTRIBUTE}
    for attribute in HOOK_DICTS:
        for sub, ref in zip(grown.modules(), plain.modules()):
            assert len(getattr(sub, attribute)) == len(getattr(ref, attribute)), (attribute, type(sub).__name__)
    assert not any(
        callable(v) and not isinstance(v, torch.nn.Module)
        for v in vars(grown).values()
        if v is not None and type(v).__module__.startswith("lightning_depthgrow")
    )

    x = torch.randn(3, 1, 1, 40)
    grown.eval()
    with torch.no_grad():
        expected = grown(x)
    buffer = io.BytesIO()
    torch.save(grown, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), copy.deepcopy(grown), pickle.loads(pickle.dumps(grown))]
    for clone in copies:
        with torch.no_grad():
            assert torch.equal(clone.eval()(x), expected)
        assert [e.to_dict() for e in event_log(clone)] == [e.to_dict() for e in log]


@pytest.mark.slow
def test_evaluating_a_fresh_module_from_a_grown_checkpoint_leaves_nothing_behind(
    make_module, loader, quiet_trainer, tmp_path
):
    _fitted(make_module, loader, quiet_trainer, [DepthGrowth.paper(final_budget=3.0, warmup_epochs=1)], tmp_path)
    ckpt = next(tmp_path.glob("**/*.ckpt"))
    fresh = make_module(max_epochs=2)
    trainer = quiet_trainer(callbacks=[DepthGrowth.paper(final_budget=3.0)])
    trainer.validate(fresh, loader(), ckpt_path=str(ckpt))
    assert len(fresh.model.blocks) == 3
    assert not fresh._load_state_dict_pre_hooks
    pickle.loads(pickle.dumps(fresh))
    copy.deepcopy(fresh)
