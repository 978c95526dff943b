"""The stdlib byte-LM benchmark task: deterministic data, FLOP counting, and ramped growth inside Trainer.fit."""

from __future__ import annotations

import sysconfig
from dataclasses import replace

import torch

from benchmarks.bench_growth_lm import ScheduledGrowth, growth_events
from benchmarks.tasks import (
    ByteLM,
    CorpusConfig,
    EvenWindows,
    LMConfig,
    RandomWindows,
    make_gpt,
    stdlib_corpus,
    stdlib_files,
    train_lm,
    train_step_flops,
)
from lightning_depthgrow.dms.appliers import ARCH_GROUP_KEY

SMALL = CorpusConfig(train_bytes=40_000, val_bytes=8_000)


def test_corpus_is_sorted_stdlib_sources_split_by_file_and_deterministic() -> None:
    files = stdlib_files()
    root = sysconfig.get_paths()["stdlib"]
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative) and len(files) > 100
    assert not any(part in {"site-packages", "test", "tests"} for r in relative for part in r.split("/")[:-1])
    train, val, info = stdlib_corpus(SMALL)
    assert (len(train), len(val)) == (40_000, 8_000)
    stdlib_corpus.cache_clear()
    again_train, again_val, again_info = stdlib_corpus(SMALL)
    assert torch.equal(train, again_train) and torch.equal(val, again_val) and info == again_info
    first_val_file = files[SMALL.val_every - 1].read_bytes()  # file 9 is the first held-out file
    assert bytes(val[:100].tolist()) == first_val_file[:100]
    assert bytes(train[:100].tolist()) == files[0].read_bytes()[:100]


def test_windows_are_deterministic_per_seed() -> None:
    train, val, _ = stdlib_corpus(SMALL)
    a, b, c = (RandomWindows(train, 16, 8, seed) for seed in (0, 0, 1))
    assert all(torch.equal(a[i], b[i]) for i in range(8))
    assert not all(torch.equal(a[i], c[i]) for i in range(8))
    assert a[0].shape == (17,) and a[0].dtype == torch.long
    windows = EvenWindows(val, 16, 4)
    assert int(windows.offsets[0]) == 0 and int(windows.offsets[-1]) == len(val) - 17


def test_train_step_flops_grow_linearly_with_depth() -> None:
    config = LMConfig(dim=16, context=8, batch_size=2)
    one, two, three = (train_step_flops(config, d) for d in (1, 2, 3))
    assert one > 0 and three - two == two - one > 0


def test_ramped_stacking_inside_trainer_fit_trains_new_blocks_and_folds() -> None:
    config = LMConfig(dim=16, heads=2, context=16, batch_size=4, steps=8, eval_every=4, val_windows=8, corpus=SMALL)
    growth = ScheduledGrowth(3, growth_events("stack_ramp", depth=2, factor=2, ramp_steps=2, seed=0))
    torch.manual_seed(0)
    model = make_gpt(config)
    result = train_lm(replace(config, depth=2), seed=0, callbacks=[growth], model=model)
    assert [e["kind"] for e in growth.events] == ["stack_blocks", "fold_ramps"]
    assert [e["step"] for e in growth.events] == [3, 5]
    assert growth.events[1]["spec"]["blocks"] == ["blocks.2", "blocks.3"]
    assert result["depth"] == 4 and result["depth_per_step"] == [[2, 3], [4, 5]]
    assert result["flops"] == 3 * train_step_flops(config, 2) + 5 * train_step_flops(config, 4)
    # The copies were trained: they moved away from the blocks they were copied from.
    assert not torch.equal(model.blocks[2].mlp.fc.weight, model.blocks[0].mlp.fc.weight)
    assert not any(hook for block in model.blocks for hook in block._forward_hooks.values())


def test_grad_clip_bounds_the_weights_gradient_norm_and_leaves_architecture_ratios_alone() -> None:
    config = LMConfig(steps=10, dim=16, heads=2, context=16, grad_clip=0.5)
    module = ByteLM(make_gpt(config), config)
    optimizer = module.configure_optimizers()["optimizer"]
    ratio = torch.nn.Parameter(torch.ones(3))
    optimizer.add_param_group({"params": [ratio], ARCH_GROUP_KEY: True})
    torch.manual_seed(0)
    (module._loss(torch.randint(0, 256, (4, 17))) * 1e3).backward()
    ratio.grad = torch.full((3,), 7.0)
    weights = [p for p in module.parameters() if p.grad is not None]
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in weights]))
    assert before > 1.0
    module.configure_gradient_clipping(optimizer)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in weights]))
    assert abs(after.item() - 0.5) < 1e-4
    assert torch.equal(ratio.grad, torch.full((3,), 7.0))
    unclipped = ByteLM(make_gpt(replace(config, grad_clip=0.0)), replace(config, grad_clip=0.0))
    (unclipped._loss(torch.randint(0, 256, (4, 17))) * 1e3).backward()
    grads = [p.grad.clone() for p in unclipped.parameters() if p.grad is not None]
    unclipped.configure_gradient_clipping(unclipped.configure_optimizers()["optimizer"])
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, [p for p in unclipped.parameters() if p.grad is not None]))
