"""DepthGrowth and NeuronGrowth use the adapters' checks inside a real Trainer.fit.

Setup runs ``check_growable`` (the adapters' refusals, then one verified trial insertion per stack on the example
input); only the stacks it accepts are planned over; every growth step is verified on the example input, and a
step that would change the function is refused with the module and the optimizer exactly as they were. Block
names in plans and reasons are the stack's real keys (torchvision ViT's ``encoder_layer_i``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import ImageClassifier, quiet_trainer, tensor_hash
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import UnsupportedModelError, register_block
from lightning_depthgrow.adapters import unregister_block
from lightning_depthgrow.callbacks import DepthGrowth, NeuronGrowth
from lightning_depthgrow.surgery import FunctionNotPreservedError

torch.set_num_threads(1)


# ---------------------------------------------------------------- tiny user blocks, registered per test


class ResidualMLP(nn.Module):
    """``x + fc2(relu(fc1(x)))``: zeroing ``fc2`` makes an identity."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class PostNorm(nn.Module):
    """``LN(x + fc(x))``. Zeroed, it computes ``LN(x)``: nearly ``x`` right after another fresh ``PostNorm`` (its
    output is already normalised, weight 1, bias 0), far from it once training moved the norms."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc(x))


class TanhAfterAdd(nn.Module):
    """``tanh(x + fc(x))``: zeroed, ``tanh(x)``, never an identity."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.fc(x))


@pytest.fixture
def registered():
    # Registered as users would, without a refuse=: the registry accepts them; only verification can tell.
    register_block(ResidualMLP, zero_init=["fc2"], name="tests.ResidualMLP")
    register_block(PostNorm, zero_init=["fc"], name="tests.PostNorm")
    register_block(TanhAfterAdd, zero_init=["fc"], name="tests.TanhAfterAdd")
    yield
    for block in (ResidualMLP, PostNorm, TanhAfterAdd):
        unregister_block(block)


class TwoStacks(LightningModule):
    """Stacks ``a`` and ``b`` of the given block types, a linear head; SGD (momentum: optimizer state to check)."""

    def __init__(self, a: type, b: type, example: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Sequential(a(), a()), nn.Sequential(b(), b())
        self.head = nn.Linear(8, 2)
        if example:
            self.example_input_array = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)), 8)


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> tuple[list[list[int]], dict]:
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    state = {
        id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    }
    return groups, state


def same_optimizer(a: tuple[list[list[int]], dict], b: tuple[list[list[int]], dict]) -> bool:
    (groups_a, state_a), (groups_b, state_b) = a, b
    if groups_a != groups_b or state_a.keys() != state_b.keys():
        return False
    return all(
        s.keys() == state_b[k].keys()
        and all(torch.equal(v, state_b[k][n]) if torch.is_tensor(v) else v == state_b[k][n] for n, v in s.items())
        for k, s in state_a.items()
    )


class LastBatchSnapshot(Callback):
    """Placed before DepthGrowth: the module and optimizer right before a growth step."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[str, list[str], tuple]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            keys = list(pl_module.state_dict())
            self.snapshots.append((tensor_hash(pl_module), keys, optimizer_snapshot(trainer.optimizers[0])))


# ---------------------------------------------------------------- refusals at setup


def test_hf_bert_is_refused_at_setup_with_the_adapters_message_module_untouched():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    class Bert(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.BertConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=32
            )
            self.model = transformers.BertForSequenceClassification(config)
            self.example_input_array = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))

        def forward(self, ids):
            return self.model(input_ids=ids).logits

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return F.cross_entropy(self(ids), torch.zeros(len(ids), dtype=torch.long))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Bert()
    digest, depth = tensor_hash(module), module.model.config.num_hidden_layers
    trainer = quiet_trainer(max_epochs=2, callbacks=[DepthGrowth.paper(final_budget=2.0, warmup_epochs=1)])
    loader = DataLoader(TensorDataset(torch.randint(0, 32, (8, 6))), batch_size=4)
    with pytest.raises(
        UnsupportedModelError, match=r"DepthGrowth: No block stack of Bert can grow.*post-LayerNorm.*ramp"
    ):
        trainer.fit(module, loader)
    assert trainer.global_step == 0
    assert tensor_hash(module) == digest and len(module.model.bert.encoder.layer) == 2
    assert module.model.config.num_hidden_layers == depth


def test_a_block_whose_zeroed_copy_is_no_identity_is_refused_at_setup_on_example_input(registered):
    # No example_input_array on the module: DepthGrowth(example_input=...) is the input the trial runs on.
    torch.manual_seed(0)
    module = TwoStacks(TanhAfterAdd, TanhAfterAdd, example=False)
    digest = tensor_hash(module)
    growth = DepthGrowth.paper(final_budget=2.0, warmup_epochs=1, placement="uniform", example_input=torch.randn(4, 8))
    trainer = quiet_trainer(max_epochs=2, callbacks=[growth])
    with pytest.raises(FunctionNotPreservedError, match=r"trial insertion.*a\.1.*not an identity.*b\.1"):
        trainer.fit(module, data())
    assert trainer.global_step == 0 and tensor_hash(module) == digest
    assert list(module.a._modules) == ["0", "1"] and list(module.b._modules) == ["0", "1"]


def test_only_stacks_that_pass_the_trial_are_planned_over(registered):
    # Stack b passes the registry but not the trial insertion: a warning names it, only stack a grows (on the
    # old main both were planned and the growth step stopped training).
    torch.manual_seed(0)
    module = TwoStacks(ResidualMLP, TanhAfterAdd)
    growth = DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, grow_every=1, placement="uniform", blocks_per_step=2, max_per_stack=None
    )
    with pytest.warns(UserWarning, match=r"not growing block stack\(s\) \['b'\].*not an identity"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, data())
    assert len(module.a) == 4 and len(module.b) == 2
    assert {e.spec["stack"] for e in module._depthgrow_event_log} == {"a"}


# ---------------------------------------------------------------- refusals at a growth step


def test_a_growth_step_that_changes_the_function_is_refused_module_and_optimizer_untouched(registered):
    # At setup the trial passes (a fresh PostNorm's output is normalised, so LN of it is itself); after a
    # training epoch the norms have moved and an inserted PostNorm renormalises. The step plans one block in
    # each stack, `a` first: `a`'s insertion is an identity, `b`'s is not. Neither stays, the optimizer is
    # the one of the last training step (momentum buffers and groups), training stops with the reason.
    torch.manual_seed(0)
    module = TwoStacks(ResidualMLP, PostNorm)
    snapshot = LastBatchSnapshot()
    growth = DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, grow_every=1, placement="uniform", blocks_per_step=2, max_per_stack=1
    )
    trainer = quiet_trainer(max_epochs=2, callbacks=[snapshot, growth])
    with pytest.raises(FunctionNotPreservedError, match=r"after b\.0 of stack 'b'.*not an identity.*undone"):
        trainer.fit(module, data())
    assert len(snapshot.snapshots) == 1, "the trial at setup passed and training reached the growth step"
    digest, keys, optimizer = snapshot.snapshots[0]
    assert tensor_hash(module) == digest and list(module.state_dict()) == keys
    assert list(module.a._modules) == ["0", "1"] and list(module.b._modules) == ["0", "1"]
    assert same_optimizer(optimizer_snapshot(trainer.optimizers[0]), optimizer)
    assert not getattr(module, "_depthgrow_event_log", [])


def test_a_verified_multi_block_step_grows_every_block_and_keeps_the_function(registered):
    # The trial of a whole step is undone before the real application: the result is the step, once.
    torch.manual_seed(0)
    module = TwoStacks(ResidualMLP, ResidualMLP)
    growth = DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, grow_every=1, placement="uniform", blocks_per_step=2, max_per_stack=1
    )
    snapshot = LastBatchSnapshot()
    quiet_trainer(max_epochs=2, callbacks=[snapshot, growth]).fit(module, data())
    assert len(module.a) == 3 and len(module.b) == 3
    assert [e.spec["stack"] for e in module._depthgrow_event_log] == ["a", "b"]


# ---------------------------------------------------------------- real block names


def test_torchvision_vit_plans_and_reasons_name_encoder_layer_keys():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )

    module = ImageClassifier(vit)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)), 4
    )
    plans = []

    class Plans(DepthGrowth):
        def plan(self, trainer, pl_module):
            plans.append(super().plan(trainer, pl_module))
            return plans[-1]

    growth = Plans(final_budget=1.3, warmup_epochs=1, grow_every=1, placement="uniform", seed=0, operator="zero_init")
    quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, loader)
    (insertion,) = plans[0]
    prefix = "model.encoder.layers.encoder_layer_"
    assert insertion.block.startswith(prefix) and insertion.block == insertion.reason["block"]
    assert insertion.reason["runners_up"] and all(r["block"].startswith(prefix) for r in insertion.reason["runners_up"])
    (event,) = module._depthgrow_event_log
    assert event.reason["block"] == insertion.block
    assert list(vit.encoder.layers._modules) == [f"encoder_layer_{i}" for i in range(4)]


# ---------------------------------------------------------------- NeuronGrowth on HF GPT-2


def test_neuron_growth_on_hf_gpt2_is_refused_clearly():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    class GPT2(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16)
            self.model = transformers.GPT2LMHeadModel(config)

        def forward(self, ids):
            return self.model(input_ids=ids).logits

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            return F.cross_entropy(self(ids[:, :-1]).reshape(-1, 32), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = GPT2()
    digest = tensor_hash(module)
    loader = DataLoader(TensorDataset(torch.randint(0, 32, (8, 6))), batch_size=4)
    # Default layers: GPT-2 has no timm Mlp; the message says what to pass and why GPT-2's MLP is not one.
    with pytest.raises(ValueError, match=r"no timm Mlp.*layers=.*Conv1D"):
        quiet_trainer(max_epochs=2, callbacks=[NeuronGrowth(final_budget=2.0)]).fit(module, loader)
    # GPT-2's c_fc named explicitly: a transformers Conv1D, refused naming it, with the way out.
    growth = NeuronGrowth(final_budget=2.0, layers={"model.transformer.h.0.mlp.c_fc": "model.transformer.h.0.mlp.act"})
    with pytest.raises(ValueError, match=r"c_fc.*Conv1D.*nn\.Linear"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, loader)
    assert tensor_hash(module) == digest


# ---------------------------------------------------------------- load_grown's message, prefixed block keys


def test_load_grown_mismatch_counts_torchvision_encoder_layer_depths(tmp_path):
    # torchvision's ViT names its blocks encoder_layer_i: the message counted 0 blocks in the checkpoint.
    torchvision = pytest.importorskip("torchvision")
    from lightning_depthgrow import load_grown
    from lightning_depthgrow.events import EventLogMismatchError

    def vit(depth: int) -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(
            image_size=16, patch_size=8, num_layers=depth, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
        )

    path = tmp_path / "vit3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in vit(3).state_dict().items()}}, path)
    model = vit(2)
    digest = tensor_hash(model)
    with pytest.raises(
        EventLogMismatchError,
        match=r"holds block-stack depths \{'encoder.layers': 3\}; the model given has \{'encoder.layers': 2\}",
    ):
        load_grown(model, path)
    assert tensor_hash(model) == digest
