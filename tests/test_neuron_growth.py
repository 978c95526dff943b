"""Per-neuron depth growth: the branch surgery is function-preserving, trainable, replayable; the callback grows
only neurons at a saddle (negative splitting eigenvalue), within its budget, and resumes bitwise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import Classifier, make_vit, quiet_trainer, tensor_hash
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.callbacks._common import event_log, load_checkpoint_events
from lightning_depthgrow.callbacks.neuron_growth import NeuronGrowth
from lightning_depthgrow.curvature.splitting import splitting_eigenvalues
from lightning_depthgrow.events import ArchitectureEvent, apply_event
from lightning_depthgrow.loading import load_grown
from lightning_depthgrow.surgery import update_optimizer
from lightning_depthgrow.surgery.neuron_branch import BranchedLinear, add_neuron_branch, neuron_branches


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make_vit(depth=2, embed_dim=8, num_heads=2)


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x), model.train()(x)


def test_plain_mlp_is_function_preserving_and_keeps_parameter_identity():
    net = mlp()
    x = torch.randn(6, 5)
    before = outputs(net, x)
    weight, bias = net[0].weight, net[0].bias
    seen = []
    handle = net[0].register_forward_hook(lambda module, args, out: seen.append(out))
    rng = torch.get_rng_state()

    change = add_neuron_branch(net, "0", [1, 4, 6], seed=3)

    net(x)
    assert len(seen) == 1 and seen[0] is not None  # the user's hook moved with the layer
    handle.remove()
    net(x)
    assert len(seen) == 1

    assert torch.equal(torch.get_rng_state(), rng)  # zeros at birth: no random draw
    assert isinstance(net[0], BranchedLinear) and net[0].weight is weight and net[0].bias is bias
    branch = net[0].branches[0]
    assert branch.neurons.tolist() == [1, 4, 6] and torch.count_nonzero(branch.proj.weight) == 0
    assert [(p is branch.proj.weight, t is weight) for p, t in change.added[:1]] == [(True, True)]
    assert change.added[1][0] is branch.proj.bias and change.added[1][1] is bias
    for a, b in zip(before, outputs(net, x)):
        assert (a - b).abs().max() <= 1e-6
    assert list(net.state_dict()) == [
        "0.weight",
        "0.bias",
        "0.branches.0.proj.weight",
        "0.branches.0.proj.bias",
        "2.weight",
        "2.bias",
    ]


def test_timm_vit_mlp_and_nested_branches_are_function_preserving():
    vit = tiny_vit()
    x = torch.randn(3, 1, 1, 40)
    before = outputs(vit, x)
    add_neuron_branch(vit, "blocks.0.mlp.fc1", [0, 5, 15])
    add_neuron_branch(vit, "blocks.1.mlp.fc1", [2])
    add_neuron_branch(vit, "blocks.0.mlp.fc1", [5, 9])  # a second branch on the same layer
    for a, b in zip(before, outputs(vit, x)):
        assert (a - b).abs().max() <= 1e-6

    # Trained (non-zero) branches, then a sub-unit nested inside one: still the same function.
    with torch.no_grad():
        for p in vit.blocks[0].mlp.fc1.branches.parameters():
            p.normal_()
    trained = outputs(vit, x)
    assert not torch.allclose(trained[0], before[0])  # the branches do contribute now
    add_neuron_branch(vit, "blocks.0.mlp.fc1.branches.0.proj", [1, 2])
    add_neuron_branch(vit, "blocks.0.mlp.fc1.branches.0.proj.branches.0.proj", [0])  # a third level
    for a, b in zip(trained, outputs(vit, x)):
        assert (a - b).abs().max() <= 1e-6
    inner = "blocks.0.mlp.fc1.branches.0.proj.branches.0"
    assert neuron_branches(vit, "blocks.0.mlp.fc1") == {
        "blocks.0.mlp.fc1.branches.0.proj": "blocks.0.mlp.fc1.branches.0.act",
        f"{inner}.proj": f"{inner}.act",
        f"{inner}.proj.branches.0.proj": f"{inner}.proj.branches.0.act",
        "blocks.0.mlp.fc1.branches.1.proj": "blocks.0.mlp.fc1.branches.1.act",
    }


def test_gradient_reaches_the_branch_and_one_step_moves_it():
    net = mlp()
    add_neuron_branch(net, "0", [1, 4])
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    F.mse_loss(net(x), y).backward()
    proj = net[0].branches[0].proj
    # u = 0 at birth: d(u + gelu(u))/du = 1 + gelu'(0) = 1.5, so dL/dW_A = 1.5 * dL/dW[S] (same input x).
    torch.testing.assert_close(proj.weight.grad, 1.5 * net[0].weight.grad[[1, 4]])
    torch.testing.assert_close(proj.bias.grad, 1.5 * net[0].bias.grad[[1, 4]])
    assert proj.weight.grad.abs().sum() > 0
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert torch.count_nonzero(proj.weight) > 0 and torch.count_nonzero(proj.bias) > 0


def test_replay_rebuilds_structure_and_loads_weights():
    grown = tiny_vit()
    events = [
        ArchitectureEvent("neuron_branch", {"linear": "blocks.0.mlp.fc1", "neurons": [3, 1]}),
        ArchitectureEvent("neuron_branch", {"linear": "blocks.0.mlp.fc1.branches.0.proj", "neurons": [0]}),
        ArchitectureEvent("neuron_branch", {"linear": "blocks.1.mlp.fc1", "neurons": [7]}),
    ]
    for event in events:
        apply_event(grown, event)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            if ".branches." in name:
                p.normal_()

    fresh = tiny_vit(seed=1)
    for event in events:
        apply_event(fresh, ArchitectureEvent.from_dict(event.to_dict()))
    assert [(n, type(m)) for n, m in fresh.named_modules()] == [(n, type(m)) for n, m in grown.named_modules()]
    assert fresh.blocks[0].mlp.fc1.branches[0].neurons.tolist() == [3, 1]
    fresh.load_state_dict(grown.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 1, 1, 40)
    for a, b in zip(outputs(grown, x), outputs(fresh, x)):
        assert torch.equal(a, b)


def test_new_parameters_join_their_twins_param_groups():
    net = mlp()
    decay = [net[0].weight, net[2].weight]
    no_decay = [net[0].bias, net[2].bias]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    F.mse_loss(net(torch.randn(4, 5)), torch.randn(4, 3)).backward()
    opt.step()
    state_before = copy.deepcopy(opt.state[net[0].weight])

    update_optimizer(opt, add_neuron_branch(net, "0", [2]), net)

    proj = net[0].branches[0].proj
    assert [p is proj.weight for p in opt.param_groups[0]["params"]] == [False, True, False]
    assert [p is proj.bias for p in opt.param_groups[1]["params"]] == [False, True, False]
    assert all(torch.equal(v, state_before[k]) for k, v in opt.state[net[0].weight].items())
    opt.zero_grad()
    F.mse_loss(net(torch.randn(4, 5)), torch.randn(4, 3)).backward()
    opt.step()
    assert torch.count_nonzero(proj.weight) > 0


@pytest.mark.parametrize(
    ("path", "neurons", "error", "match"),
    [
        ("1", [0], TypeError, r"'1' is a GELU; add_neuron_branch needs exactly an nn.Linear"),
        ("5", [0], ValueError, r"No module at '5'"),
        ("", [0], ValueError, r"the model itself cannot be replaced"),
        ("0", [7], ValueError, r"neuron indices \[7\] are out of range for '0' with 7 output neurons; valid .*0..6"),
        ("0", [-1], ValueError, r"out of range"),
        ("0", [2, 2], ValueError, r"duplicates \[2\]"),
        ("0", [], ValueError, r"neurons is empty"),
        ("0", [1.5], TypeError, r"neurons must be ints"),
    ],
)
def test_bad_input_fails_clearly_and_leaves_the_model_unchanged(path, neurons, error, match):
    net = mlp()
    add_neuron_branch(net, "2", [0])
    before = copy.deepcopy(net)
    with pytest.raises(error, match=match):
        add_neuron_branch(net, path, neurons)
    assert [(n, type(m)) for n, m in net.named_modules()] == [(n, type(m)) for n, m in before.named_modules()]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.state_dict().values()))


def test_attention_out_proj_subclass_is_rejected():
    attn = nn.MultiheadAttention(4, 1)
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        add_neuron_branch(attn, "out_proj", [0])


# ---------------------------------------------------------------------------------------------- the callback

EPOCHS = 3
STEP_BUDGET = 30  # parameters per growth step: three neurons of an 8-input fc1 (8 weights + 1 bias each)


def make_module(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(make_vit(depth=1, embed_dim=8, num_heads=2), max_epochs=EPOCHS)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(80, 1, 1, 40, generator=g), torch.randint(0, 10, (80,), generator=g)


def fit(module: Classifier, ckpt_dir: Path, ckpt_path: str | None = None, min_neurons: int = 1) -> NeuronGrowth:
    growth = NeuronGrowth(
        step_budget=STEP_BUDGET, budget_mode="absolute", scale_by_lr=False, warmup_epochs=1, min_neurons=min_neurons
    )
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=EPOCHS, callbacks=[growth, checkpoint], enable_checkpointing=True, deterministic=True
    )
    x, y = data()
    # Fixed order, no dropout: a resumed run sees exactly what the uninterrupted one saw.
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    trainer.fit(module, train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16), ckpt_path=ckpt_path)
    return growth


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("neurons")
    module = make_module()
    growth = fit(module, ckpt_dir)
    return module, growth, ckpt_dir


@pytest.mark.slow
def test_fit_grows_the_most_negative_neurons_within_budget(uninterrupted):
    full, growth, ckpt_dir = uninterrupted
    log = event_log(full)
    assert log and {e.kind for e in log} == {"neuron_branch"} and {e.epoch for e in log} == {0, 1}
    for epoch in (0, 1):
        assert sum(e.cost["params"] for e in log if e.epoch == epoch) <= STEP_BUDGET
    assert all(v < 0 for e in log for v in e.reason["eigenvalues"])

    # Recompute epoch 0's eigenvalues independently: the epoch-0 checkpoint holds the weights at growth time (the
    # branch is zero there, so fc1's outputs, gradients and hence eigenvalues are those before growth) and the
    # captured batch is the epoch's last one.
    module = load_grown(make_module(seed=7), str(ckpt_dir / "epoch=0.ckpt"))
    x, y = data()
    fc1 = "model.blocks.0.mlp.fc1"
    lam = splitting_eigenvalues(
        module,
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        [(x[48:64], y[48:64])],
        layers={fc1: (fc1, "model.blocks.0.mlp.act")},
    )[fc1]
    first = [e for e in log if e.epoch == 0]
    assert [e.spec["linear"] for e in first] == [fc1]
    most_negative = torch.argsort(lam)[: min(STEP_BUDGET // 9, int((lam < 0).sum()))]
    assert first[0].spec["neurons"] == sorted(most_negative.tolist())
    torch.testing.assert_close(torch.tensor(first[0].reason["eigenvalues"]), lam[first[0].spec["neurons"]])

    # The second step ranks fc1's neurons together with those of the branch grown in the first (nesting).
    assert set(growth.latest) == {fc1, f"{fc1}.branches.0.proj"}
    ranked = sorted((v, path, i) for path, values in growth.latest.items() for i, v in enumerate(values))
    second = {(e.spec["linear"], i) for e in log if e.epoch == 1 for i in e.spec["neurons"]}
    assert second == {(path, i) for _, path, i in ranked[: STEP_BUDGET // 9]}


@pytest.mark.slow
def test_layers_with_fewer_than_min_neurons_selected_do_not_grow(tmp_path):
    module = make_module()
    growth = fit(module, tmp_path, min_neurons=3)
    log = event_log(module)
    # Epoch 0 picks three fc1 neurons (one layer qualifies); epoch 1's budget is split between fc1 and the new
    # branch (as in the run with min_neurons=1), so no layer reaches three and nothing grows.
    assert [(e.epoch, len(e.spec["neurons"])) for e in log] == [(0, 3)] and growth.last_growth_epoch == 1
    ranked = sorted((v, path) for path, values in growth.latest.items() for v in values)
    picked = [path for _, path in ranked[: STEP_BUDGET // 9]]
    assert len(set(picked)) > 1 and max(picked.count(path) for path in picked) < 3


@pytest.mark.slow
def test_resume_after_growth_is_bitwise_identical(uninterrupted, tmp_path):
    full, _, ckpt_dir = uninterrupted
    assert len(load_checkpoint_events(str(ckpt_dir / "epoch=0.ckpt"))) >= 1
    resumed = make_module(seed=123)  # fresh weights: everything must come from the checkpoint
    fit(resumed, tmp_path, ckpt_path=str(ckpt_dir / "epoch=0.ckpt"))

    assert [e.spec for e in event_log(resumed)] == [e.spec for e in event_log(full)]
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert list(full_state) == list(resumed_state)
    assert all(torch.equal(v, resumed_state[k]) for k, v in full_state.items())
    full_opt, resumed_opt = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    for index, state in full_opt["state"].items():
        assert all(torch.equal(v, resumed_opt["state"][index][k]) for k, v in state.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step_budget": 0}, ValueError, "`step_budget` must be a finite number > 0"),
        ({"step_budget": "0.1"}, TypeError, "`step_budget`"),
        ({"final_budget": 0.5}, ValueError, "`final_budget`"),
        ({"budget_mode": "percent"}, ValueError, "`budget_mode`"),
        ({"min_neurons": 0}, ValueError, "`min_neurons` must be an int >= 1"),
        ({"num_batches": True}, TypeError, "`num_batches`"),
        ({"warmup_epochs": 1.0}, TypeError, "`warmup_epochs`"),
        ({"scale_by_lr": 1}, TypeError, "`scale_by_lr`"),
        ({"nest": "no"}, TypeError, "`nest`"),
        ({"seed": "0"}, TypeError, "`seed`"),
        ({"layers": {"model.fc1": 3}}, ValueError, "`layers` must be None"),
        ({"loss_fn": "mse"}, TypeError, "`loss_fn`"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuronGrowth(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"at": [0.5], "warmup_epochs": 1}, ValueError, "Give either at="),
        ({"at": [0.5], "grow_every": 2}, ValueError, "Give either at="),
        ({"at": [1.5]}, ValueError, "at"),
        ({"at": []}, ValueError, "at"),
    ],
)
def test_at_is_refused_with_an_epoch_schedule_or_bad_fractions(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuronGrowth(**kwargs)


# ------------------------------------------------------------------- the example GPT (byte-level LM benchmark)


def test_example_gpt_mlp_act_module_is_bitwise_functional_gelu_and_mlp_ratio_sets_width():
    from examples.gpt_blocks import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab_size=16, context=8, dim=16, depth=2, num_heads=2)
    assert [block.mlp.fc.out_features for block in model.blocks] == [64, 64]  # default mlp_ratio 4.0
    assert all(type(block.mlp.act) is nn.GELU for block in model.blocks)
    x = torch.randn(3, 8, 16)
    mlp = model.blocks[0].mlp
    assert torch.equal(mlp(x), mlp.proj(F.gelu(mlp.fc(x))))  # the former functional forward, bitwise
    idx = torch.randint(0, 16, (2, 8))

    def functional_forward(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        h = net.tok_emb(idx) + net.pos_emb[:, : idx.shape[1]]
        for block in net.blocks:
            h = h + block.attn(block.ln1(h))
            h = h + block.mlp.proj(F.gelu(block.mlp.fc(block.ln2(h))))
        return net.head(net.ln_f(h))

    assert torch.equal(model(idx), functional_forward(model, idx))
    narrow = TinyGPT(vocab_size=16, context=8, dim=16, depth=2, num_heads=2, mlp_ratio=1.5)
    assert [block.mlp.fc.out_features for block in narrow.blocks] == [24, 24]
    assert narrow.blocks[1].mlp.proj.in_features == 24


class _KeepModule(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        self.module = pl_module


def test_at_fractions_grow_the_byte_lm_gpt_after_those_optimizer_steps():
    from benchmarks.tasks import CorpusConfig, LMConfig, make_gpt, train_lm

    config = LMConfig(
        dim=16,
        heads=2,
        context=16,
        batch_size=4,
        steps=8,
        eval_every=4,
        val_windows=8,
        corpus=CorpusConfig(train_bytes=40_000, val_bytes=8_000),
    )
    layers = {f"model.blocks.{i}.mlp.fc": f"model.blocks.{i}.mlp.act" for i in range(2)}
    growth = NeuronGrowth(step_budget=0.05, scale_by_lr=False, layers=layers, at=[0.25, 0.5])
    torch.manual_seed(0)
    model, keep = make_gpt(config), _KeepModule()
    result = train_lm(config, seed=0, callbacks=[growth, keep], model=model)
    log = event_log(keep.module)
    assert log and {e.kind for e in log} == {"neuron_branch"}
    assert sorted({e.step for e in log}) == [2, 4]  # right after optimizer steps 2 and 4 of 8 (one epoch)
    start = growth.start_params
    for step in (2, 4):
        assert sum(e.cost["params"] for e in log if e.step == step) <= 0.05 * start
    grown = {e.spec["linear"] for e in log}
    assert grown <= set(layers) | {p for path in layers for p in neuron_branches(keep.module, path)}
    assert result["params"] == start + sum(e.cost["params"] for e in log)
    # The branches born at step 2 trained for 6 steps: no longer zero.
    first = keep.module.get_submodule(log[0].spec["linear"]).branches[0].proj.weight
    assert torch.count_nonzero(first) > 0


# ---------------------------------------------------------------------------------------------- DDP


class _RankRecorder(pl.Callback):
    """Per rank: the event log and a hash of every parameter after each epoch, written to ``out/rank{r}.json``."""

    def __init__(self, out: str) -> None:
        self.out, self.records = out, []

    def on_train_epoch_end(self, trainer, pl_module):
        ddp = trainer.strategy.model
        self.records.append(
            {
                "hash": tensor_hash(pl_module, parameters_only=True),
                "events": [{"kind": e.kind, "spec": e.spec} for e in event_log(pl_module)],
                "ddp_params": sum(1 for _ in ddp.parameters()),
                "module_params": sum(1 for _ in pl_module.parameters()),
            }
        )
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


@pytest.mark.slow
def test_ddp_ranks_grow_identical_neurons_and_stay_in_sync(tmp_path):
    module = make_module()
    growth = NeuronGrowth(step_budget=STEP_BUDGET, budget_mode="absolute", scale_by_lr=False, warmup_epochs=1)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[growth, _RankRecorder(str(tmp_path))],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x, y = data()
    # The distributed sampler gives each rank its own half: their splitting eigenvalues differ before the all-reduce.
    trainer.fit(module, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert any(record["events"] for record in ranks[0])  # it did grow
    assert all(r["ddp_params"] == r["module_params"] for r in ranks[0])  # DDP re-wrapped with the new branches
