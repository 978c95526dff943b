"""DMS's embedding-width gate (``embed=True``) on Hugging Face ViT and torchvision ``VisionTransformer``, real classes
from tiny configs, random init.

Without a Trainer: the hard-masked supernet computes what the sliced export computes (every layer runs, masked
channels stay 0 in the stream), DMS's counts of the export equal FlopCounterMode's and the parameter count, the
exported model rebuilds (HF: ``save_pretrained`` / ``from_pretrained``; the architecture record on a fresh
supernet), variants that cannot be handled are refused with the model untouched. Inside a real ``Trainer.fit``: the
export lands within 5% of a FLOPs target, equals the hard-masked supernet, reloads, and nothing is left on the
module.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import UnsupportedModelError, find_block_stacks, load_grown
from lightning_depthgrow.callbacks import DifferentiableModelScaling
from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    build_architecture,
    discover_gates,
    export_architecture,
    export_model,
    find_gates,
    remove_gates,
    set_importance,
)
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops, count_parameters
from lightning_depthgrow.surgery import update_optimizer
from tests._helpers import quiet_trainer, set_keep, tensor_hash

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HF = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=5,
    initializer_range=0.2,  # sharp attention: a wrong scale or channel shows in the outputs
)


def hf_vit(seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**{**HF, **options})).eval()


def hf_vit_model(seed: int = 0, **options) -> nn.Module:
    """A ``ViTModel`` with its pooler and a mask token (masked-patch inputs)."""
    torch.manual_seed(seed)
    model = transformers.ViTModel(transformers.ViTConfig(**{**HF, **options}), use_mask_token=True).eval()
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
    return model


MASKED = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.3  # which of the 16 patches are masked


def outputs(model: nn.Module, x: torch.Tensor = X) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if isinstance(model, transformers.ViTModel):
            out = model(pixel_values=x, bool_masked_pos=MASKED)
            return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        return {"logits": model(pixel_values=x).logits}


def randomise(model: nn.Module, ratio: float, depth_ratio: float = 0.0, seed: int = 1, **flags):
    """Gates as a search might leave them: random importances, every gate at ``ratio`` (depth at ``depth_ratio``)."""
    gates = attach_gates(model, heads=False, embed=True, **flags)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, depth_ratio if g.kind == "depth" else ratio))
    return gates


def layers(model: nn.Module) -> list[nn.Module]:
    (stack,) = find_block_stacks(model)
    return list(stack.blocks)


def check_every_layer_runs(model: nn.Module) -> None:
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(layers(model))]
    try:
        outputs(model)
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(len(layers(model))))


def check_nothing_left(model: nn.Module) -> None:
    assert find_gates(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    pickle.dumps(model)
    copy.deepcopy(model)


# ------------------------------------------------------------------------------------ Hugging Face ViT
def test_hf_discovery_is_opt_in_and_one_gate_per_model():
    model = hf_vit()
    assert not any(s["site"] == "hf_vit_embed" for s in discover_gates(model, heads=False))
    specs = discover_gates(model, heads=False, embed=True)
    embed = [s for s in specs if s["site"] == "hf_vit_embed"]
    # one gate on the classifier: the ViTModel inside it is covered by it
    assert embed == [{"name": ":embed", "kind": "width", "site": "hf_vit_embed", "block": "", "n": 32, "min_keep": 1}]
    assert sorted(s["kind"] for s in specs) == ["depth", "width", "width", "width", "width"]
    wrapped = [s["name"] for s in discover_gates(Classifier(hf_vit()), heads=False, embed=True)]
    assert wrapped[0] == "model:embed"


@pytest.mark.parametrize("make", [hf_vit, hf_vit_model, lambda: hf_vit(qkv_bias=False, layer_norm_eps=1e-6)])
def test_hf_hard_masked_supernet_computes_what_the_export_computes(make):
    model = make()
    gates = randomise(model, 0.4, depth_ratio=0.3)
    keep = gates.keep()
    kept = keep[":embed"]
    assert 0 < len(kept) < 32 and len(keep["vit/layers:depth" if hasattr(model, "vit") else "layers:depth"]) == 2
    masked = outputs(model)
    res = ResourceModel.build(model, X)
    predicted = float(res.evaluate(gates, "flops", hard=True)), float(res.evaluate(gates, "params", hard=True))
    export_model(model)
    check_nothing_left(model)
    assert model.config.hidden_size == len(kept) and model.config.head_dim == 16  # the heads keep their size
    assert model.config.num_hidden_layers == len(layers(model)) == 2
    sliced = outputs(model)
    for name, value in masked.items():
        if name == "last_hidden_state":  # the stream itself: the kept channels, the others were exactly 0
            assert bool((value[..., [i for i in range(32) if i not in kept]] == 0).all())
            value = value[..., kept]
        assert sliced[name].shape == value.shape
        torch.testing.assert_close(sliced[name], value, rtol=1e-5, atol=1e-5)
    check_every_layer_runs(model)
    assert count_flops(model, X).total == predicted[0]
    assert count_parameters(model) == predicted[1]


def test_hf_masked_channels_stay_zero_in_the_residual_stream():
    model = hf_vit()
    gates = randomise(model, 0.5, width=False, depth=False)
    dropped = [i for i in range(32) if i not in gates.keep()[":embed"]]
    seen = []
    for layer in layers(model):
        layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    outputs(model)
    assert len(seen) == 3 and all(bool((out[..., dropped] == 0).all()) for out in seen)


def test_hf_soft_masks_train_the_embedding_gate():
    model = hf_vit().train()
    gates = attach_gates(model, heads=False, embed=True)
    model(pixel_values=X).logits.square().mean().backward()
    pending = gates.gates[":embed"].take_pending()
    assert pending.shape == (32,) and bool(pending.abs().gt(0).all())


@pytest.mark.parametrize("make", [hf_vit, hf_vit_model])
def test_hf_export_reloads_with_from_pretrained(make, tmp_path):
    """Uniform MLP widths (tied), a layer removed: the config describes the export, which reloads as itself."""
    model = make()
    gates = attach_gates(model, heads=False, embed=True, tie="width")
    gen = torch.Generator().manual_seed(2)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(0.3 if g.kind == "depth" else 0.45)
    export_model(model)
    expected = outputs(model)
    assert model.config.intermediate_size == layers(model)[0].mlp.fc1.out_features < 64
    model.save_pretrained(tmp_path)
    extra = {"use_mask_token": True} if isinstance(model, transformers.ViTModel) else {}  # not in the config
    loaded = type(model).from_pretrained(tmp_path, **extra).eval()
    got = outputs(loaded)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


def test_hf_per_layer_widths_warn_and_refuse_from_pretrained_but_rebuild_from_the_record(tmp_path):
    searched = hf_vit()
    randomise(searched, 0.45, depth_ratio=0.3)
    with torch.no_grad():  # the layers keep different MLP widths
        find_gates(searched).gates["vit/layers/0:mlp"].ratio.fill_(0.2)
    arch = export_architecture(searched)
    assert arch["flags"] == {"width": True, "heads": False, "depth": True, "embed": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(searched)
    assert any("intermediate_size" in str(w.message) and "build_architecture" in str(w.message) for w in caught)
    searched.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(searched).from_pretrained(tmp_path)
    fresh = hf_vit(seed=5)
    build_architecture(fresh, arch)
    fresh.load_state_dict(searched.state_dict())
    assert torch.equal(outputs(fresh)["logits"], outputs(searched)["logits"])


REFUSED = {
    "masked_image_modeling": lambda: transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**HF)),
    "model_without_pooler": lambda: transformers.ViTModel(transformers.ViTConfig(**HF), add_pooling_layer=False),
    "no_labels": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**{**HF, "num_labels": 0})),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hf_unsupported_variants_are_refused_with_the_model_untouched(case):
    torch.manual_seed(0)
    model = REFUSED[case]()
    before = tensor_hash(model)
    with pytest.raises(UnsupportedModelError, match="embed=False"):
        attach_gates(model, heads=False, embed=True)
    assert tensor_hash(model) == before
    check_nothing_left(model)


def test_hf_heads_are_refused_with_what_to_do():
    model = hf_vit()
    with pytest.raises(UnsupportedModelError, match="heads=False"):
        attach_gates(model, embed=True)
    check_nothing_left(model)


def test_hf_remove_gates_restores_the_model():
    model = hf_vit()
    before = outputs(model)
    randomise(model, 0.5)
    remove_gates(model)
    check_nothing_left(model)
    assert torch.equal(outputs(model)["logits"], before["logits"])


# ------------------------------------------------------------------------------------ inside Trainer.fit
class Classifier(pl.LightningModule):
    """Cross-entropy around an image classifier (HF ``...ForImageClassification`` or a torchvision model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = X[:2]

    def forward(self, x):
        out = self.model(pixel_values=x) if isinstance(self.model, transformers.PreTrainedModel) else self.model(x)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def loader(n: int = 64, classes: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, classes, (n,), generator=g)), batch_size=16)


class Snapshot(pl.Callback):
    """A deep copy of the module at the start of epoch ``epoch``: listed before DMS, the gated supernet it exports;
    after DMS, the exported model."""

    def __init__(self, key: str, store: dict, epoch: int) -> None:
        self.key, self.store, self.epoch = key, store, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.store[self.key] = copy.deepcopy(pl_module, {id(trainer): trainer})


def fit(module: nn.Module, dms: DifferentiableModelScaling, search_epochs: int = 2) -> dict:
    store: dict = {}
    callbacks = [Snapshot("supernet", store, search_epochs), dms, Snapshot("exported", store, search_epochs)]
    trainer = quiet_trainer(
        max_epochs=search_epochs + 1, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0
    )
    trainer.fit(module, loader())
    store["trainer"] = trainer
    return store


def test_hf_dms_fit_exports_on_target_a_model_that_matches_the_supernet_and_reloads(tmp_path):
    torch.manual_seed(0)
    module = Classifier(hf_vit())
    full = count_flops(module, X[:2]).total
    dms = DifferentiableModelScaling(target=0.5, search_epochs=2, arch_lr=0.05, embed=True, heads=False, tie="width")
    store = fit(module, dms)

    log = event_log(module)
    assert [e.kind for e in log] == ["dms_attach", "dms_export"]
    export = log[-1]
    assert export.reason["kept"]["model:embed"] < 32  # the embedding width was cut
    exported = store["exported"]
    assert abs(count_flops(exported, X[:2]).total / (0.5 * full) - 1) <= 0.05
    supernet = store["supernet"]
    set_keep(find_gates(supernet), export.spec["keep"])
    supernet.eval(), exported.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(X), supernet(X), rtol=1e-5, atol=1e-5)
    net = module.model
    assert net.config.hidden_size == export.reason["kept"]["model:embed"] == net.vit.layernorm.normalized_shape[0]
    check_every_layer_runs(net)
    net.save_pretrained(tmp_path)
    loaded = type(net).from_pretrained(tmp_path).eval()
    assert torch.equal(outputs(loaded)["logits"], outputs(net)["logits"])
    check_nothing_left(module)
    assert not [k for k in module.__dict__ if k.startswith("_depthgrow") and k != "_depthgrow_event_log"]


# ------------------------------------------------------------------------------------ torchvision VisionTransformer
torchvision = pytest.importorskip("torchvision")
TV = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)


def tv_vit(seed: int = 0, **options) -> nn.Module:
    """torchvision's tiny ViT; its head starts at zero (torchvision's init), so every weight gets noise too."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(**{**TV, **options}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def tv_out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def tv_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.encoder.layers)


def test_tv_discovery_is_one_gate_over_head_dimensions():
    model = tv_vit()
    assert not any(s["site"] == "torchvision_vit_embed" for s in discover_gates(model, heads=False))
    (embed,) = [s for s in discover_gates(model, heads=False, embed=True) if s["site"] == "torchvision_vit_embed"]
    # element s: dimension s of each of the 2 heads, and residual channels s and s + 16
    assert embed == {
        "name": ":embed",
        "kind": "width",
        "site": "torchvision_vit_embed",
        "block": "",
        "n": 16,
        "tile": 2,
        "min_keep": 1,
    }


@pytest.mark.parametrize("options", [{}, {"representation_size": 12}, {"num_layers": 3, "num_heads": 4}])
def test_tv_hard_masked_supernet_computes_what_the_export_computes_and_rebuilds(options):
    model = tv_vit(**options)
    heads = model.encoder.layers[0].self_attention.num_heads
    gates = randomise(model, 0.4, depth_ratio=0.4)
    keep = gates.keep()
    kept = len(keep[":embed"])
    assert 0 < kept < 32 // heads and len(keep["encoder/layers:depth"]) < len(tv_blocks(model))
    masked = tv_out(model)
    res = ResourceModel.build(model, X)
    predicted = float(res.evaluate(gates, "flops", hard=True)), float(res.evaluate(gates, "params", hard=True))
    arch = export_architecture(model)
    export_model(model)
    check_nothing_left(model)
    assert model.hidden_dim == kept * heads == model.conv_proj.out_channels
    for block in tv_blocks(model):
        attn = block.self_attention
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (kept * heads, heads, kept)
    torch.testing.assert_close(tv_out(model), masked, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the module's own training path too (the eval fast path is not taken there)
        torch.testing.assert_close(model.train()(X), masked, rtol=1e-5, atol=1e-5)
    ran = []
    for i, block in enumerate(tv_blocks(model)):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    tv_out(model)
    assert ran == list(range(len(tv_blocks(model))))
    assert count_flops(model, X).total == predicted[0]
    assert count_parameters(model) == predicted[1]
    # torchvision has no config: the architecture record rebuilds it on a fresh supernet, which takes its weights
    fresh = tv_vit(seed=5, **options)
    build_architecture(fresh, arch)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(tv_out(fresh), tv_out(model))


def _query_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.eval().zero_grad()
    model(X).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "in_proj" in n}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adagrad"])
def test_tv_rescaled_query_rows_take_their_optimizer_state_along(optimizer):
    """The export multiplies each attention's query rows by sqrt(kept / n) (the supernet's 1 / sqrt(head_dim)), so
    their gradient is divided by it: Adam's moments and SGD's momentum are divided by it (and its square) too."""
    model = tv_vit()
    gates = randomise(model, 0.5, width=False, depth=False)
    params = [p for n, p in model.named_parameters() if "dms" not in n and p.requires_grad]
    make = {
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-3),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=1e-3),
    }[optimizer]
    opt = make()
    for _ in range(2):  # populate the state; the step changes the weights a little, the masks stay hard
        _query_grads(model)
        opt.step()
    before = _query_grads(model)
    old = {n: p for n, p in model.named_parameters() if "in_proj" in n}
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in old.items()}
    n, kept = gates.gates[":embed"].n, len(gates.keep()[":embed"])
    change = export_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        update_optimizer(opt, change)
    after = _query_grads(model)
    scale = (kept / n) ** 0.5
    index = {id(new): idx for _, new, idx in change.replaced}
    rescaled = {id(new) for new, _ in change.rescaled}
    assert len(rescaled) == 4  # in_proj_weight and in_proj_bias of each of the 2 blocks
    for name, new in ((n_, p) for n_, p in model.named_parameters() if "in_proj" in n_):
        assert id(new) in rescaled
        rows = torch.ones(new.shape[0])
        rows[: new.shape[0] // 3] = scale  # the query rows only
        rows = rows.reshape(-1, *[1] * (new.dim() - 1))
        idx = index[id(new)]

        def sliced(t: torch.Tensor, idx: tuple = idx) -> torch.Tensor:
            for d, k in enumerate(idx):
                t = t if k is None else t.index_select(d, k)
            return t

        # why the state is divided: the exported query rows' gradient is the supernet's divided by the scale
        torch.testing.assert_close(after[name], sliced(before[name]) / rows, rtol=1e-4, atol=1e-6)
        state = opt.state[new]
        if optimizer == "adamw":
            torch.testing.assert_close(state["exp_avg"], sliced(old_state[name]["exp_avg"]) / rows)
            torch.testing.assert_close(state["exp_avg_sq"], sliced(old_state[name]["exp_avg_sq"]) / rows**2)
        elif optimizer == "sgd":
            torch.testing.assert_close(state["momentum_buffer"], sliced(old_state[name]["momentum_buffer"]) / rows)
        else:  # not known: kept as sliced, with a warning
            torch.testing.assert_close(state["sum"], sliced(old_state[name]["sum"]))
    warned = [str(w.message) for w in caught if "rescaled parameter" in str(w.message)]
    assert bool(warned) == (optimizer == "adagrad")


def test_tv_masked_channels_stay_zero_in_the_residual_stream():
    model = tv_vit()
    gates = randomise(model, 0.5, width=False, depth=False)
    kept = gates.keep()[":embed"]
    dropped = [c for c in range(32) if c % 16 not in kept]
    seen = []
    for block in tv_blocks(model):
        block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    tv_out(model)
    assert len(seen) == 2 and all(bool((out[..., dropped] == 0).all()) for out in seen)


def test_tv_soft_masks_train_the_embedding_gate():
    model = tv_vit().train()
    gates = attach_gates(model, heads=False, embed=True)
    model(X).square().mean().backward()
    pending = gates.gates[":embed"].take_pending()
    assert pending.shape == (16,) and bool(pending.abs().gt(0).all())


def test_tv_dms_fit_exports_on_target_a_model_that_matches_the_supernet_and_rebuilds(tmp_path):
    torch.manual_seed(0)
    module = Classifier(tv_vit())
    full = count_flops(module, X[:2]).total
    dms = DifferentiableModelScaling(target=0.5, search_epochs=2, arch_lr=0.05, embed=True, heads=False)
    store = fit(module, dms)

    log = event_log(module)
    assert [e.kind for e in log] == ["dms_attach", "dms_export"]
    export = log[-1]
    assert export.reason["kept"]["model:embed"] < 16  # the embedding width was cut
    exported = store["exported"]
    assert abs(count_flops(exported, X[:2]).total / (0.5 * full) - 1) <= 0.05
    supernet = store["supernet"]
    set_keep(find_gates(supernet), export.spec["keep"])
    supernet.eval(), exported.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(X), supernet(X), rtol=1e-5, atol=1e-5)
    net = module.model
    assert net.hidden_dim == 2 * export.reason["kept"]["model:embed"]
    assert len(tv_blocks(net)) == export.reason["kept"]["model/encoder/layers:depth"]
    arch = export_architecture(module, log)
    fresh = tv_vit(seed=7)
    build_architecture(fresh, arch)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(tv_out(fresh), tv_out(net))
    # load_grown: the starting network (any weights) plus the checkpoint's events and weights is the trained one
    store["trainer"].save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_grown(tv_vit(seed=8), tmp_path / "last.ckpt")
    assert tensor_hash(loaded) == tensor_hash(net) and torch.equal(tv_out(loaded), tv_out(net))
    check_nothing_left(module)


class SubclassedViT(torchvision.models.VisionTransformer):
    pass


TV_REFUSED = {
    "conv_stem": lambda: tv_vit(
        conv_stem_configs=[
            torchvision.models.vision_transformer.ConvStemConfig(out_channels=8, kernel_size=8, stride=8)
        ]
    ),
    "subclass": lambda: SubclassedViT(**TV),
}


@pytest.mark.parametrize("case", list(TV_REFUSED))
def test_tv_unsupported_variants_are_refused_with_the_model_untouched(case):
    model = TV_REFUSED[case]()
    before = tensor_hash(model)
    with pytest.raises(UnsupportedModelError, match="embed=False"):
        attach_gates(model, heads=False, embed=True)
    assert tensor_hash(model) == before
    check_nothing_left(model)


def test_tv_heads_are_refused_and_remove_gates_restores_the_model():
    model = tv_vit()
    with pytest.raises(UnsupportedModelError, match="heads=False"):
        attach_gates(model, embed=True)
    check_nothing_left(model)
    before = tv_out(model)
    randomise(model, 0.5)
    remove_gates(model)
    check_nothing_left(model)
    assert torch.equal(tv_out(model), before)


# ------------------------------------------------------------------------------------ code around the gated model
class HeadOnViTModel(pl.LightningModule):
    """A ``ViTModel`` with the LightningModule's own head, on the class token of ``last_hidden_state`` (the stream,
    which the embedding gate narrows) or on ``pooler_output`` (which keeps its width)."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.backbone = hf_vit_model()
        self.head = nn.Linear(32, 5)
        self.read = read
        self.example_input_array = X[:2]

    def forward(self, x):
        out = self.backbone(pixel_values=x)
        features = out.pooler_output if self.read == "pooler" else out.last_hidden_state[:, 0]
        return self.head(features)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


class HeadOnFeatures(HeadOnViTModel):
    """A timm ``VisionTransformer`` built with ``num_classes=0`` (its output is the pooled stream itself) and the
    LightningModule's own head on it."""

    def __init__(self) -> None:
        timm = pytest.importorskip("timm")
        pl.LightningModule.__init__(self)
        torch.manual_seed(0)
        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=32, num_classes=0
        )
        self.head = nn.Linear(32, 5)
        self.example_input_array = X[:2]

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("make", [lambda: HeadOnViTModel("last_hidden_state"), HeadOnFeatures])
def test_a_head_outside_the_gated_model_on_the_stream_is_refused_at_setup(make):
    module = make()
    before = tensor_hash(module)
    dms = DifferentiableModelScaling(target=0.7, search_epochs=1, embed=True, heads=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[dms], limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(UnsupportedModelError, match=r"embed=True.*(no longer runs|change shape).*embed=False"):
        trainer.fit(module, loader())
    assert tensor_hash(module) == before and event_log(module) == [] and trainer.global_step == 0
    check_nothing_left(module)


def test_a_head_on_the_pooler_output_of_a_vit_model_is_searched():
    torch.manual_seed(0)
    module = HeadOnViTModel("pooler")
    full = count_flops(module, X[:2]).total
    dms = DifferentiableModelScaling(target=0.6, search_epochs=1, embed=True, heads=False, depth=False)
    trainer = quiet_trainer(max_epochs=2, callbacks=[dms], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, loader())
    export = event_log(module)[-1]
    # the gated ViTModel sits inside the module ("backbone"): its counts follow it there
    assert abs(count_flops(module, X[:2]).total / (0.6 * full) - 1) <= 0.05
    assert export.kind == "dms_export" and module.backbone.config.hidden_size == export.reason["kept"]["backbone:embed"]
    assert module.backbone.config.hidden_size < 32 and module(X).shape == (3, 5)
