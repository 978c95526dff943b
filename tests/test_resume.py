"""Resume a growing run from a checkpoint and load a grown model: both must reproduce the uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Classifier, make_vit, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import EventLogMismatchError
from lightning_depthgrow.callbacks._common import event_log, load_checkpoint_events
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.loading import load_grown

pytestmark = pytest.mark.slow  # multi-epoch Trainer runs

EPOCHS = 4


def make_module(depth: int = 2, embed_dim: int = 16, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(make_vit(depth=depth, embed_dim=embed_dim, num_heads=2), max_epochs=EPOCHS)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(80, 1, 1, 40, generator=g), torch.randint(0, 10, (80,), generator=g)
    # Fixed data order (no shuffle) and no dropout: a resumed run sees exactly what the uninterrupted one saw.
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]))


def fit(module: Classifier, ckpt_dir: Path, ckpt_path: str | None = None) -> pl.Trainer:
    growth = DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="curvature", seed=3)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS, callbacks=[growth, checkpoint], enable_checkpointing=True, deterministic=True
    )
    train, val = loaders()
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("full")
    module = make_module()
    fit(module, ckpt_dir)
    return module, ckpt_dir


def test_resume_after_growth_is_bitwise_identical(uninterrupted, tmp_path):
    full, ckpt_dir = uninterrupted
    # Growth at the end of epochs 0, 1 and 2; the epoch-1 checkpoint holds two of them (saved after validation).
    assert len(full.model.blocks) == 5
    assert len(load_checkpoint_events(str(ckpt_dir / "epoch=1.ckpt"))) == 2

    resumed = make_module(seed=123)  # fresh weights: everything must come from the checkpoint
    fit(resumed, tmp_path, ckpt_path=str(ckpt_dir / "epoch=1.ckpt"))

    assert [e.spec for e in event_log(resumed)] == [e.spec for e in event_log(full)]
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert list(full_state) == list(resumed_state)
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    full_opt, resumed_opt = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    for index, state in full_opt["state"].items():
        assert all(torch.equal(v, resumed_opt["state"][index][k]) for k, v in state.items())


def test_load_grown_reproduces_logits(uninterrupted):
    full, ckpt_dir = uninterrupted
    last = str(ckpt_dir / f"epoch={EPOCHS - 1}.ckpt")
    x = torch.randn(7, 1, 1, 40)
    full.eval()
    with torch.no_grad():
        expected = full(x)

    torch.manual_seed(99)
    bare = load_grown(make_vit(depth=2, embed_dim=16, num_heads=2), last)  # "model." prefix detected
    assert len(bare.blocks) == 5
    module = load_grown(make_module(seed=5), last)  # the whole LightningModule
    with torch.no_grad():
        assert torch.equal(bare.eval()(x), expected)
        assert torch.equal(module.eval()(x), expected)
    assert [e.spec for e in event_log(module)] == [e.spec for e in event_log(full)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 3}, r"holds block-stack depths \{'blocks': 5\}; the model given has \{'blocks': 3\}"),
        ({"embed_dim": 32}, r"checkpoint \(1, 1, 16\) vs model \(1, 1, 32\)"),
    ],
)
def test_load_grown_with_another_starting_model_fails_cleanly(uninterrupted, kwargs, match):
    _, ckpt_dir = uninterrupted
    torch.manual_seed(0)
    model = make_vit(**{"depth": 2, "embed_dim": 16, "num_heads": 2, **kwargs})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EventLogMismatchError, match=match):
        load_grown(model, str(ckpt_dir / f"epoch={EPOCHS - 1}.ckpt"))
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_resume_with_a_model_the_log_does_not_fit(uninterrupted, tmp_path):
    _, ckpt_dir = uninterrupted
    # A one-block start: either an insertion index is out of range (the event log does not fit) or the replayed
    # model is one block short of the checkpoint's weights. Either way resume stops before training.
    module = make_module(depth=1)
    with pytest.raises(RuntimeError, match=r"(does not fit|Unexpected key|Missing key)"):
        fit(module, tmp_path, ckpt_path=str(ckpt_dir / "epoch=1.ckpt"))
    assert module.trainer.global_step == 0


def test_resume_with_a_log_that_fits_only_partly_leaves_the_module_untouched(uninterrupted, tmp_path):
    _, ckpt_dir = uninterrupted
    checkpoint = torch.load(ckpt_dir / "epoch=1.ckpt", weights_only=False)
    events = checkpoint["lightning_depthgrow"]["events"]
    assert events, "the epoch-1 checkpoint must hold at least one growth event"
    # The first events fit; the last one names a stack the model does not have.
    events.append({**events[0], "spec": {**events[0]["spec"], "stack": "model.no_such_stack"}})
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(EventLogMismatchError, match="no_such_stack"):
        fit(module, tmp_path / "out", ckpt_path=str(tmp_path / "bad.ckpt"))
    assert len(module.model.blocks) == 2 and event_log(module) == []
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs", [{"embed_dim": 32}, {"depth": 1}], ids=["wider", "shallower"])
def test_resume_from_another_models_checkpoint_leaves_the_module_untouched(uninterrupted, tmp_path, kwargs):
    # Issue 9.3: the checkpoint's events fit (same family), its weights do not. Events and weights are tried on a
    # copy first, so the module stays as it was: no block added, no log, same weights, no hook left behind.
    _, ckpt_dir = uninterrupted
    module = make_module(**kwargs)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    depth = len(module.model.blocks)
    with pytest.raises(EventLogMismatchError, match=r"weights do not fit|does not fit"):
        fit(module, tmp_path, ckpt_path=str(ckpt_dir / "epoch=1.ckpt"))
    assert len(module.model.blocks) == depth and event_log(module) == []
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert not module._load_state_dict_pre_hooks


def test_load_grown_and_the_planners_need_no_lightning(uninterrupted, tmp_path):
    # load_grown in a process where importing Lightning fails: the bare timm network is rebuilt and loaded.
    full, ckpt_dir = uninterrupted
    x = torch.randn(3, 1, 1, 40)
    full.eval()
    with torch.no_grad():
        torch.save({"x": x, "logits": full(x)}, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    raise ImportError("Lightning is blocked in this process: " + name)
        sys.meta_path.insert(0, Block())
        import timm, torch
        from lightning_depthgrow import load_grown
        import lightning_depthgrow.growth  # the planning core needs no Lightning either
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(1, 40), patch_size=(1, 4),
                                in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)
        load_grown(vit, {str(ckpt_dir / f"epoch={EPOCHS - 1}.ckpt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(vit.eval()(expected["x"]), expected["logits"])
        assert len(vit.blocks) == 5
        assert not any(m.split(".")[0] == "lightning" for m in sys.modules)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
