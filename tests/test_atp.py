"""ATP: spatial lattice order, redundancy scores, learned and solved thresholds, soft training masks."""

import pytest
import torch
from conftest import assert_batch_equals_single

from vlm_compress import compress
from vlm_compress.config import MethodConfig
from vlm_compress.modules.atp import ThresholdHeads
from vlm_compress.pruners.atp import ATPPruner, lattice_order, spatial_scores
from vlm_compress.pruners.llm_base import PrefillContext
from vlm_compress.testing import LlavaDims, build_llava

LAYERS = 4
N = 16


@pytest.fixture()
def deep(tokenizer):
    return build_llava(tokenizer, LlavaDims(text_layers=LAYERS))


def fixed_heads(path, layers, theta_r, theta_s):
    """Heads whose thresholds are constants (zero last layer, bias = logit θ)."""
    heads = ThresholdHeads(layers, init_thresholds=(theta_r, theta_s))
    heads.save(path)
    return str(path)


def test_lattice_order_is_coarse_to_fine():
    order = lattice_order(16).argsort(descending=True).tolist()  # 4×4 grid
    assert order[:4] == [0, 2, 8, 10]  # (0,0), then the stride-2 lattice in raster order
    scores = lattice_order(144)  # 12×12: the stride-4 lattice precedes the stride-2 cells
    stride4 = [r * 12 + c for r in range(0, 12, 4) for c in range(0, 12, 4)]
    assert set(scores.argsort(descending=True)[:9].tolist()) == set(stride4)
    assert lattice_order(6).argsort(descending=True)[:3].tolist() == [0, 4, 2]  # not square: 1-D index
    visual = torch.tensor([[False, True, True, True, True, False, True, True, True, True]])
    runs = spatial_scores(visual)
    assert torch.equal(runs[0, 1:5], lattice_order(4)) and torch.equal(runs[0, 6:], lattice_order(4))
    assert runs[0, 0] == 0 and runs[0, 5] == 0


def context(visual_count=4, text=2):
    s = 1 + visual_count + text
    visual = torch.zeros(1, s, dtype=torch.bool)
    visual[0, 1 : 1 + visual_count] = True
    return PrefillContext(visual=visual, valid=torch.ones_like(visual), alive=torch.ones_like(visual),
                          protected=torch.zeros_like(visual), images=torch.tensor([1]), num_layers=32)


class TableView:
    """A LayerView over a fixed attention table [1, S, S] (row q, key j)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, rows):
        return self.table[:, rows[0]]

    def received(self, *groups):
        return tuple(self(group).sum(dim=1) for group in groups)


def test_scores_follow_the_formula():
    ctx = context()  # visual at 1..4, text at 5, 6
    table = torch.zeros(1, 7, 7)  # row q, key j
    table[0, 1:5, 1:5] = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.6, 0.2, 0], [0.1, 0.1, 0.1, 0.4]])
    table[0, 5, 1:5] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    table[0, 6, 1:5] = torch.tensor([0.3, 0.2, 0.1, 0.0])

    s_self, s_cross = ATPPruner(heads=None).scores(ctx, TableView(table))
    received = torch.tensor([1.8, 1.2, 0.3, 0.4]) / torch.tensor([4.0, 3.0, 2.0, 1.0])  # ÷ queries that see the key
    torch.testing.assert_close(s_self[0, 1:5], received / received.max())
    cross = torch.tensor([0.2, 0.2, 0.2, 0.2])  # mean of the two text rows
    torch.testing.assert_close(s_cross[0, 1:5], cross / cross.max())
    assert s_self[0, [0, 5, 6]].abs().sum() == 0


def test_learned_rule_keeps_redundancy_or_spatial_survivors(tmp_path):
    ctx = context()
    ctx.extras["atp_spatial"] = spatial_scores(ctx.visual)  # a 2×2 grid: [1, .75, .5, .25]
    ctx.extras["atp_share"] = torch.tensor([0.5], dtype=torch.float64)
    ctx.extras["atp_stage"] = 0
    pruner = ATPPruner(budget=0.5, heads=fixed_heads(tmp_path, [2], theta_r=0.6, theta_s=0.8))
    table = torch.zeros(1, 7, 7)
    table[0, 1:5, 1:5] = torch.eye(4) * torch.tensor([1.0, 0.2, 0.2, 0.9])  # S_self ∝ [1, .2, .2, .9]/seen_by
    table[0, 5:7, 1:5] = torch.tensor([0.1, 0.1, 0.1, 0.7])
    s_self, s_cross = pruner.scores(ctx, TableView(table))
    pruner.after_layer(2, ctx, TableView(table))
    red = (s_self + s_cross)[0, 1:5] / 2
    spatial = ctx.extras["atp_spatial"][0, 1:5]
    expected = (red > 0.6) | (spatial > 0.8)
    assert ctx.alive[0, 1:5].tolist() == expected.tolist()
    assert expected.tolist() == [True, False, False, True]  # token 1 by space, token 4 by redundancy


@pytest.mark.parametrize("learned", [False, True], ids=["training-free", "learned"])
def test_full_budget_is_identity(deep, batch, tmp_path, learned):
    reference = deep(**batch).logits
    heads = fixed_heads(tmp_path, [0, 1, 2], 0.9, 0.9) if learned else None  # thresholds that would prune
    compress(deep, budget=1.0, method=ATPPruner(heads=heads))
    assert torch.equal(deep(**batch).logits, reference)


def test_training_free_variant_meets_the_layer_averaged_budget(deep, batch):
    compress(deep, budget=0.5, method=ATPPruner(heads=None))
    deep(**batch)
    stats = deep.compression.stats
    assert abs(stats.layer_avg_visual_tokens - 0.5 * N) <= 0.75  # per-stage rounding
    assert stats.layer_visual_tokens == sorted(stats.layer_visual_tokens, reverse=True)


@pytest.mark.parametrize("learned", [False, True], ids=["training-free", "learned"])
def test_batch_equals_single(deep, processor, images, batch, tmp_path, learned):
    heads = fixed_heads(tmp_path, [0, 1, 2], 0.5, 0.8) if learned else None
    compress(deep, budget=0.5, method=ATPPruner(heads=heads))
    assert_batch_equals_single(deep, processor, images, batch)


def test_soft_training_masks_drop_nothing_and_train_the_heads(deep, batch, tmp_path):
    path = fixed_heads(tmp_path, [0, 1, 2], 0.5, 0.8)
    config = ATPPruner(budget=0.5, heads=path, soft=True)
    compress(deep, method=config)
    logits = deep(**batch).logits
    assert deep.compression.stats.layer_visual_tokens == [N] * LAYERS  # soft: every token processed
    share = config.soft_layer_average(deep.compression.prefill.ctx)
    assert ((share > 0.25) & (share < 1.0)).all()
    heads = config.module()
    heads.zero_grad()
    (logits[:, -1].logsumexp(-1).sum() + share.sum()).backward()
    output = heads.heads["0"][2]  # zero-initialised output layer: the gradient starts there
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in output.parameters())


def test_bad_configurations_name_the_fix(deep, tmp_path):
    with pytest.raises(ValueError, match="heads=None"):
        compress(deep, budget=0.5, method=ATPPruner(heads=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="cover layers"):
        compress(deep, budget=0.5, method=ATPPruner(heads=fixed_heads(tmp_path, [5], 0.5, 0.5)))
    with pytest.raises(ValueError, match="raise the budget"):
        compress(deep, budget=0.2, method=ATPPruner(heads=None))
    with pytest.raises(ValueError, match="spatial_share"):
        ATPPruner(spatial_share=1.5)


def test_config_round_trips_through_json():
    config = ATPPruner(budget=0.33, heads=None, layers_of_32=(4, 12))
    assert MethodConfig.from_json(config.to_json()) == config


def test_int_budget_above_the_token_count_keeps_everything(deep, batch, processor):
    reference = deep(**batch).logits
    compress(deep, budget=10 * N, method=ATPPruner(heads=None))
    assert torch.equal(deep(**batch).logits, reference)
    text_only = processor(text=["USER: hello ASSISTANT:"], return_tensors="pt")
    deep(**text_only)  # no image in the prompt: every layer runs untouched
    assert deep.compression.prefill.slots is None
