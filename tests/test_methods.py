"""Each method's selection against its formula, on small hand-built scores and features."""

import dataclasses
import math

import pytest
import torch

from vlm_compress.adapters.base import ImageBatch, TokenLayout
from vlm_compress.ops import pooled_grid_shape
from vlm_compress.pruners.base import EncoderContext
from vlm_compress.pruners.cls_attn import ClsAttnPruner
from vlm_compress.pruners.pool import PoolPruner
from vlm_compress.pruners.random import RandomPruner
from vlm_compress.pruners.visionzip import VisionZipPruner


@dataclasses.dataclass
class FakeCapture:
    """Stands in for AttentionCapture: fixed CLS rows [I, T] and head-mean keys [I, T, C]."""

    rows: torch.Tensor
    keys: torch.Tensor = None

    def first_row_attention(self, layer, head_reduce="mean", kind="probs"):
        return self.rows

    def head_mean_keys(self, layer):
        return self.keys


def context(features, keep, rows=None, keys=None, grid=(2, 3), vision=None, offset=1, project=None):
    i, n, _ = features.shape
    rows = rows if rows is not None else torch.zeros(i, n + offset)
    keys = keys if keys is not None else torch.zeros(i, n + offset, 2)
    tower = n + offset
    images = ImageBatch(
        features=features,
        vision_features=vision if vision is not None else features,
        layout=TokenLayout.single_grid(grid, n - grid[0] * grid[1]),
        source=torch.arange(i)[:, None] * tower + offset + torch.arange(n),
        tower_length=tower,
        project=project or (lambda x: x),
    )
    return EncoderContext(images=images, keep=[keep] * i, image_index_in_prompt=list(range(i)), capture=FakeCapture(rows, keys))


def test_cls_attn_takes_top_scores_in_raster_order():
    feats = torch.arange(6.0).view(1, 6, 1).repeat(1, 1, 2)
    # tower row: CLS column first, then 6 patch columns
    rows = torch.tensor([[9.0, 0.1, 0.5, 0.05, 0.3, 0.5, 0.2]])
    sel = ClsAttnPruner(budget=3).select(context(feats, 3, rows))
    # patches 1 and 4 tie at 0.5 → both kept; then 3 (0.3); raster order
    assert sel.kept_index[0].tolist() == [1, 3, 4]
    assert torch.equal(sel.features[0][:, 0], torch.tensor([1.0, 3.0, 4.0]))


def test_cls_attn_ties_go_to_lower_index():
    feats = torch.zeros(1, 6, 1)
    rows = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    sel = ClsAttnPruner(budget=2).select(context(feats, 2, rows))
    assert sel.kept_index[0].tolist() == [0, 1]


def test_random_is_seeded_and_prompt_rank_keyed():
    feats = torch.randn(3, 6, 2)
    ctx = context(feats, 3)
    ctx.image_index_in_prompt = [0, 1, 0]
    a = RandomPruner(budget=3, seed=7).select(ctx)
    b = RandomPruner(budget=3, seed=7).select(ctx)
    assert [t.tolist() for t in a.kept_index] == [t.tolist() for t in b.kept_index]
    assert torch.equal(a.kept_index[0], a.kept_index[2])
    expected = torch.randperm(6, generator=torch.Generator().manual_seed(8))[:3].sort().values
    assert torch.equal(a.kept_index[1], expected)


def test_pool_averages_windows():
    feats = torch.arange(16.0).view(1, 16, 1)  # 4×4 grid with value = raster index
    ctx = context(feats, 4, grid=(4, 4), offset=1)
    sel = PoolPruner(budget=4).select(ctx)
    # 2×2 windows of a 4×4 raster: means of {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    assert sel.features[0][:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert sel.kept_index[0].tolist() == [0, 2, 8, 10]
    assert sel.merged_into[0].view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_pool_grid_rule():
    assert pooled_grid_shape(115, (24, 24)) == (10, 10)
    assert pooled_grid_shape(288, (24, 24)) == (16, 16)
    assert pooled_grid_shape(58, (24, 24)) == (7, 7)
    assert pooled_grid_shape(576, (24, 24)) == (24, 24)
    h, w = pooled_grid_shape(100, (12, 24))
    assert h * w <= 100 and w == 2 * h
    for k in range(1, 577):
        h, w = pooled_grid_shape(k, (24, 24))
        assert h == w == max(1, math.isqrt(k))


def test_pool_keeps_prefix_tokens():
    feats = torch.arange(17.0).view(1, 17, 1)  # CLS + 4×4
    sel = PoolPruner(budget=5).select(context(feats, 5, grid=(4, 4), offset=0))
    assert sel.features[0][:, 0].tolist() == [0.0, 3.5, 5.5, 11.5, 13.5]


def test_visionzip_dominant_and_contextual():
    # 6 tokens; vision-space values v_j; keys put tokens {0,2,5} near target A and {3} near target B
    vision = torch.tensor([[[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]])
    projected = vision * 2
    rows = torch.tensor([[9.0, 0.1, 0.9, 0.2, 0.1, 0.8, 0.3]])  # CLS col, then 6 patches
    keys = torch.tensor([[[0.0, 0.0], [1, 0], [0, 1], [1, 0.1], [0.1, 1], [0, 1], [1, 0]]])
    pruner = VisionZipPruner(budget=4, contextual_ratio=0.5)
    assert pruner.split(4) == (2, 2)
    ctx = context(projected, 4, rows=rows, keys=keys, vision=vision, project=lambda x: x * 2)
    sel = pruner.select(ctx)
    # dominant: patches 1 (0.9) and 4 (0.8), raster order
    assert sel.kept_index[0][:2].tolist() == [1, 4]
    # remaining [0,2,3,5]; step = 4 // 2 = 2 → targets at positions 0 and 2 → tokens 0 and 3
    assert sel.kept_index[0][2:].tolist() == [0, 3]
    # keys: token 2 [1,.1] and token 5 [1,0] are closest to target 0 [1,0]; nothing joins target 3 [.1,1]
    # contextual = v_target + mean(v_assigned), then projected (×2)
    expected_a = (10.0 + (30.0 + 60.0) / 2) * 2
    expected_b = 40.0 * 2
    assert sel.features[0][:, 0].tolist() == [40.0, 100.0, expected_a, expected_b]
    assert sel.merged_into[0].tolist() == [2, 0, 2, 3, 1, 2]


def test_visionzip_full_budget_is_identity():
    feats = torch.randn(2, 6, 3)
    sel = VisionZipPruner(budget=1.0).select(context(feats, 6))
    assert all(torch.equal(f, g) for f, g in zip(sel.features, feats))


# ---- AnyRes methods on a hand-built LLaVA-NeXT layout ------------------------------------------------------------
# thumbnail 2×2 (tokens 0-3), two crops side by side (1×2), each 2×2, stitched into a 2×4 high-resolution grid with
# a newline after each row: packed = [t0 t1 t2 t3 | c0(0,0) c0(0,1) c1(0,0) c1(0,1) NL | c0(1,0) c0(1,1) c1(1,0) c1(1,1) NL]
ANYRES_WHERE = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1])  # flat tower-token index (4 per tower image)


def anyres_context(keep, rows):
    """``rows``: [3, 5] CLS rows of the thumbnail and the two crops (CLS column first)."""
    from vlm_compress.adapters.llava_next import anyres_layout

    layout = anyres_layout(ANYRES_WHERE, per_tower=4, first_tower=0, side=2, crop_layout=(1, 2))
    n = layout.num_tokens
    source = torch.where(ANYRES_WHERE >= 0, (ANYRES_WHERE // 4) * 5 + 1 + ANYRES_WHERE % 4, -1)[None]
    features = torch.arange(float(n)).view(1, n, 1)
    images = ImageBatch(features=features, vision_features=features, layout=layout, source=source, tower_length=5,
                        project=lambda x: x)
    return EncoderContext(images=images, keep=[keep], image_index_in_prompt=[0], capture=FakeCapture(rows))


def test_anyres_layout_of_the_hand_built_image():
    ctx = anyres_context(1, torch.zeros(3, 5))
    layout = ctx.layout
    assert layout.grids == {0: (2, 2), 1: (2, 4)} and layout.num_newlines == 2
    assert layout.crop.tolist() == [-1] * 4 + [0, 0, 1, 1, -1, 0, 0, 1, 1, -1]
    assert layout.cell[9].tolist() == [1, 0] and layout.cell[12].tolist() == [1, 3]
    assert layout.crop_extents() == {0: (0, 2, 0, 2), 1: (0, 2, 2, 4)}


class LayerRows(FakeCapture):
    """CLS rows per vision layer: ``{layer: [3, 5]}``."""

    def first_row_attention(self, layer, head_reduce="mean", kind="probs"):
        return self.rows[layer]


def hired_rows():
    initial = torch.zeros(3, 5)
    initial[0, 1:] = torch.tensor([0.9, 0.1, 0.8, 0.2])  # thumbnail: the left column draws the early attention
    final = torch.zeros(3, 5)
    final[0, 1:] = torch.tensor([0.1, 0.4, 0.3, 0.2])
    final[1, 1:] = torch.tensor([0.5, 0.1, 0.3, 0.4])  # crop 0, its own CLS
    final[2, 1:] = torch.tensor([0.2, 0.6, 0.1, 0.0])  # crop 1
    return {0: initial, -2: final}


def test_hired_splits_the_budget_and_selects_per_partition():
    from vlm_compress.pruners.hired import HiREDPruner

    ctx = anyres_context(6, None)
    ctx.capture = LayerRows(hired_rows())
    # k=6, α=0.5: thumbnail top-3 by final attention → t1 t2 t3. Crops get 3; the top-2 thumbnail cells by initial
    # attention (0 and 2) both show the left half → crop 0 gets all 3: its tokens 0, 3, 2 → packed 4, 10, 9.
    sel = HiREDPruner(budget=6).select(ctx)
    assert sel.kept_index[0].tolist() == [1, 2, 3, 4, 9, 10]
    # official raster bands: thumbnail cells 0,1 → crop 0, cells 2,3 → crop 1 → counts 1:1 → budgets 2 and 1;
    # crop 0 keeps tokens 0, 3 (packed 4, 10), crop 1 keeps token 1 = high-res (0, 3) → packed 7
    sel = HiREDPruner(budget=6, official_bands=True).select(ctx)
    assert sel.kept_index[0].tolist() == [1, 2, 3, 4, 7, 10]
    budgets = HiREDPruner(budget=6).crop_budgets(ctx.layout, 3, hired_rows()[0][0, 1:])
    assert budgets == [3, 0]


def visionzip_anyres_context(keep):
    """The hand-built AnyRes image with hired's final-layer CLS rows, random keys, and tower features equal to the
    token index except at newlines (1000: any merge that took one in would show)."""
    ctx = anyres_context(keep, hired_rows()[-2])
    ctx.capture.keys = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0))
    vision = ctx.images.vision_features.clone()
    vision[0, ctx.layout.newline] = 1000.0
    ctx.images.vision_features = vision
    return ctx


def test_visionzip_anyres_per_crop_split():
    ctx = visionzip_anyres_context(6)
    sel = VisionZipPruner(budget=6, contextual_ratio=0.5).select(ctx)
    # 4 + 4 + 4 content tokens → 2 each → 1 dominant + 1 contextual per sub-image, each by its own CLS:
    # thumbnail [.1 .4 .3 .2] → t1, rest {0, 2, 3} → target 0; crop 0 (packed 4 5 9 10) [.5 .1 .3 .4] → 4, rest
    # {5, 9, 10} → target 5; crop 1 (packed 6 7 11 12) [.2 .6 .1 0] → 7, rest {6, 11, 12} → target 6
    assert sel.kept_index[0].tolist() == [1, 4, 7, 0, 5, 6]
    assert sel.features[0][:, 0].tolist() == [1.0, 4.0, 7.0, 0 + (2 + 3) / 2, 5 + (9 + 10) / 2, 6 + (11 + 12) / 2]
    assert sel.merged_into[0].tolist() == [3, 0, 3, 3, 1, 4, 5, 2, -1, 4, 4, 5, 5, -1]


@pytest.mark.parametrize("per_crop", [True, False])
@pytest.mark.parametrize("keep", [6, 9, 11])  # every part gets a contextual token
def test_visionzip_anyres_never_merges_newlines(per_crop, keep):
    ctx = visionzip_anyres_context(keep)
    sel = VisionZipPruner(budget=keep, contextual_ratio=0.5, per_crop=per_crop).select(ctx)
    newline = ctx.layout.newline
    assert sel.features[0].shape[0] == keep
    assert not newline[sel.kept_index[0]].any()  # neither dominant nor a contextual target
    assert (sel.merged_into[0][newline] == -1).all() and (sel.merged_into[0][~newline] >= 0).all()
    assert (sel.features[0] < 1000).all()  # no newline's features merged into any token


def test_visionzip_anyres_global_variant_is_one_selection():
    ctx = visionzip_anyres_context(6)
    sel = VisionZipPruner(budget=6, contextual_ratio=0.5, per_crop=False).select(ctx)
    # d = 3 over the whole image: 7 (.6), 4 (.5), then 1 and 10 tie at .4 → 1; 9 content tokens remain, step 3
    rest = [0, 2, 3, 5, 6, 9, 10, 11, 12]
    assert sel.kept_index[0].tolist() == [1, 4, 7, rest[0], rest[3], rest[6]]


def test_hired_counts_are_exact_and_newlines_go_last():
    from vlm_compress.pruners.hired import HiREDPruner

    for keep in range(1, 15):
        ctx = anyres_context(keep, None)
        ctx.capture = LayerRows(hired_rows())
        kept = HiREDPruner(budget=keep).select(ctx).kept_index[0]
        assert kept.numel() == keep and torch.equal(kept, kept.sort().values)
        assert bool(ctx.layout.newline[kept].any()) == (keep > 12)


def test_apportion_sums_exactly_with_caps():
    from vlm_compress.budget import apportion

    assert apportion(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]  # remainder to the lower index on ties
    assert apportion(10, [5, 1, 0], [3, 10, 10]) == [3, 7, 0]  # a capped share passes on in proportion
    assert apportion(100, [1, 2], [5, 5]) == [5, 5]
    assert apportion(7, [0, 0], [4, 4]) == [4, 3]  # no weight: in proportion to the caps


@dataclasses.dataclass
class MeansCapture:
    """Stands in for AttentionCapture.attention_means: fixed received/given [tower images, T-1]."""

    received: torch.Tensor
    given: torch.Tensor
    has_cls = True

    def attention_means(self, layer, kind="logits"):
        return self.received, self.given


def test_fopru_rank_picks_the_more_varied_statistic():
    from vlm_compress.pruners.fopru import FoPruPruner

    feats = torch.arange(6.0).view(1, 6, 1)
    ctx = context(feats, 3)
    ctx.capture = MeansCapture(torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0]]), torch.tensor([[1.0, 1, 1, 1, 1, 1.1]]))
    assert FoPruPruner(budget=3).select(ctx).kept_index[0].tolist() == [1, 3, 4]  # received varies more
    assert FoPruPruner(budget=3, statistic="given").select(ctx).kept_index[0].tolist() == [0, 1, 5]  # ties: lower index
    # row: the 2×3 grid's row 1 (mean 0.4) whole, then the best token of row 0 (token 1)
    ctx = context(feats, 4)
    ctx.capture = MeansCapture(torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0]]), torch.zeros(1, 6))
    assert FoPruPruner(budget=4, strategy="row").select(ctx).kept_index[0].tolist() == [1, 3, 4, 5]


def test_fopru_row_keeps_a_high_resolution_row_with_its_newline():
    from vlm_compress.pruners.fopru import FoPruPruner

    ctx = anyres_context(7, None)
    received = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.9, 0.9, 0.0, 0.0], [0.9, 0.9, 0.0, 0.0]])
    ctx.capture = MeansCapture(received, torch.zeros(3, 4))
    # high-res row 0 (mean 0.9) costs 4 tokens + its newline; thumbnail row 1 (mean 0.3) fills the last 2
    assert FoPruPruner(budget=7, strategy="row").select(ctx).kept_index[0].tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert FoPruPruner(budget=7, strategy="rank").select(ctx).kept_index[0].tolist() == [0, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="strategy"):
        FoPruPruner(strategy="rows")


def test_globalcom2_thumbnail_commands_the_crops():
    from vlm_compress.pruners.globalcom2 import GlobalCom2Pruner

    rows = torch.zeros(3, 5)
    rows[0, 1:] = torch.tensor([4.0, 0.0, 4.0, 0.0])  # thumbnail: the left half matters
    rows[1, 1:] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # crop 0, its own CLS logits
    rows[2, 1:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # crop 1
    ctx = anyres_context(6, None)
    ctx.capture = LayerRows({-1: rows})
    pruner = GlobalCom2Pruner(budget=6)
    # R = 6/12. σ = softmax([8, 0] / 10); r_j = R(1 + σ_j − 1/2)
    sigma = torch.tensor([0.8, 0.0]).softmax(0)
    torch.testing.assert_close(pruner.retention(0.5, rows[0, 1:], ctx.layout), 0.5 * (1 + sigma - 0.5))
    # thumbnail keeps round(R·4) = 2: cells 0 and 2. Crops share 4 in proportion to r_j·4 = 2.38 : 1.62 → 2 and 2.
    # Global map = bilinear 2×2 → 2×4: each row [4, 3, 1, 0]. Crop 0: L2(local [0,0,0,1]) + L2(global [4,3,4,3])
    # → members 3 and 0 (packed 10 and 4). Crop 1: L2([1,0,0,0]) + L2([1,0,1,0]) → members 0, 2 (packed 6, 11).
    assert pruner.select(ctx).kept_index[0].tolist() == [0, 2, 4, 6, 10, 11]
    kept = GlobalCom2Pruner(budget=6, keep_newlines=True).select(ctx).kept_index[0]
    assert kept.numel() == 6 and {8, 13} <= set(kept.tolist())  # both newlines kept, 4 content tokens


@dataclasses.dataclass
class HiddenCapture(FakeCapture):
    hidden_states: dict = None


def test_mustdrop_merges_alike_windows_and_protects_key_tokens():
    from vlm_compress.pruners.mustdrop import MustDropPruner

    # a 3×6 grid = two 3×3 windows; window A (columns 0-2) has identical layer-0 states, window B orthogonal ones
    n = 18
    hidden = torch.zeros(1, n + 1, n + 1)
    window_a = [r * 6 + c for r in range(3) for c in range(3)]
    for t in range(n):
        hidden[0, 1 + t, 0 if t in window_a else 1 + t] = 1.0
    scores = torch.zeros(1, n + 1)
    scores[0, 1:] = torch.linspace(0.01, 0.18, n)  # later tokens draw more CLS attention
    feats = torch.arange(float(n)).view(1, n, 1).repeat(1, 1, 2)
    ctx = context(feats, 12, scores, grid=(3, 6))
    ctx.capture = HiddenCapture(scores, hidden_states={0: hidden})
    sel = MustDropPruner(budget=12).select(ctx)
    # A merges into its last member (token 14); 10 tokens remain, fewer than the budget, so all stay
    assert sel.kept_index[0].tolist() == [3, 4, 5, 9, 10, 11, 14, 15, 16, 17]
    merged = sel.features[0][sel.kept_index[0].tolist().index(14)]
    torch.testing.assert_close(merged, feats[0, window_a].mean(0))  # size-weighted mean of the window
    assert sel.merged_into[0][window_a].tolist() == [6] * 9
    # key set: ceil(0.08 · 10) = 1 token, the best-scored survivor (17, output slot 9)
    assert sel.protected[0].tolist() == [9]
    # budget 5: the key token, then the best of the rest by CLS score; the merged token scores its members' mean
    # (mean index 7 → 0.08), below tokens 10 and 11
    ctx.keep = [5]
    sel = MustDropPruner(budget=5).select(ctx)
    assert sel.kept_index[0].tolist() == [10, 11, 15, 16, 17] and sel.protected[0].tolist() == [4]


def test_m3_scales_are_nested_pools_and_budgets_map_below():
    from vlm_compress.pruners.m3 import M3Pruner, m3_kernels

    assert m3_kernels((24, 24)) == [1, 2, 4, 8, 24] and m3_kernels((12, 12)) == [1, 2, 4, 12]
    feats = torch.arange(16.0).view(1, 16, 1)  # 4×4 grid, value = raster index
    for keep, side in ((16, 4), (15, 2), (4, 2), (3, 1)):
        ctx = context(feats, keep, grid=(4, 4))
        sel = M3Pruner(budget=keep).select(ctx)
        grid = feats.view(4, 4)
        k = 4 // side
        expected = grid.view(side, k, side, k).mean((1, 3)).flatten()  # avg_pool2d(kernel=stride=k)
        torch.testing.assert_close(sel.features[0][:, 0], expected)
    # AnyRes: thumbnail 2×2 and high-res 2×4 pooled with the same kernel; newlines dropped
    ctx = anyres_context(3, torch.zeros(3, 5))
    plan = M3Pruner(budget=3).plan(3, ctx.layout)
    assert plan == [(0, (1, 1)), (1, (1, 2))]  # one token per crop, as M3's per-grid pooling
