"""DART (pivot tokens + duplication, in the LLM at layer K): the reference's hand-built case, the engine's layer view
(post-RoPE keys, output through the final norm), budget counts, identity, batch = single, restore, NeXT, Qwen2-VL."""

import dataclasses

import pytest
import torch
from conftest import PROMPTS, assert_batch_equals_single

from vlm_compress import compat, compress, restore
from vlm_compress.budget import ratio_budget_count
from vlm_compress.pruners.dart import DARTPruner, dart_select, pivot_quota
from vlm_compress.pruners.llm_base import PrefillPruner
from vlm_compress.testing import (
    LlavaDims, QwenDims, build_llava, build_llava_next, build_next_processor, build_qwen, build_qwen_processor,
    random_images,
)

LAYERS = 4
N = 16  # visual tokens per image of the test LLaVA (4×4 grid)
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture()
def deep(tokenizer):
    """The test LLaVA with a 4-layer LLM (K=2 leaves two layers with the kept tokens)."""
    return build_llava(tokenizer, LlavaDims(text_layers=LAYERS))


# -- the selection on hand-built inputs (reference/sota-methods.md §3, "Smallest CPU test") ----------------------


def test_reference_seven_token_case():
    """s=1, L=4, identity norm, 1 + 1 pivots, T=1: P_img={1}, P_txt={6}; pivot 1 claims 3, pivot 6 claims 2."""
    hidden = torch.tensor([[0, 0, 1], [1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0.6, 0.6, 0.5], [0.9, 0.1, 0], [0, 0.2, 1]])
    norms = torch.tensor([0.5, 3, 1, 2, 1.5, 0.1, 4])  # ||k||_1: image (3, 1, 2, 1.5), text (0.1, 4)
    keys = torch.stack([norms * 0.25, -norms * 0.75], dim=1)  # signs do not matter to an L1 norm
    kept = dart_select(hidden, keys, range(1, 5), [5, 6], pivots_image=1, pivots_text=1, per_pivot=1)
    assert kept.tolist() == [1, 2, 3]
    sequence = sorted({0} | set(kept.tolist()) | {5, 6})
    assert sequence == [0, 1, 2, 3, 5, 6]  # the positions the later layers keep (gaps, not 0..5)
    # per-pivot counts in claim order: the image pivot alone claims two (its least similar: 3, then 4)
    assert dart_select(hidden, keys, range(1, 5), [5, 6], 1, 1, [2, 0]).tolist() == [1, 3, 4]


def test_a_duplicate_of_a_pivot_is_dropped():
    """Token 2 equals the pivot (token 1, largest key norm): cosine 1, never claimed; of the two only one stays."""
    hidden = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0]])
    keys = torch.tensor([[5.0], [1.0], [0.5], [0.4], [0.3]])
    kept = dart_select(hidden, keys, range(5), [], pivots_image=1, pivots_text=0, per_pivot=2)
    assert kept.tolist() == [0, 2, 3]
    # two identical non-pivot tokens tie for a pivot's single claim: the lower position takes it
    hidden = torch.tensor([[1.0, 0], [0, 1.0], [0, 1.0], [0.7, 0.7]])
    kept = dart_select(hidden, torch.tensor([[9.0], [1.0], [1.0], [1.0]]), range(4), [], 1, 0, 1)
    assert kept.tolist() == [0, 1]


def test_pivot_quota_keeps_exactly_the_count():
    assert pivot_quota(12, 16, 10) == (4, 4, [1] * 8)  # the official 4 + 8·T
    assert pivot_quota(10, 16, 10) == (4, 4, [1] * 6 + [0] * 2)  # the remainder to the first pivots (image first)
    assert pivot_quota(30, 16, 2) == (4, 2, [2] * 6)  # 2 text tokens: 2 text pivots; capped at 16 visual tokens
    assert pivot_quota(3, 16, 10) == (3, 4, [0] * 7)  # fewer than 4: the top-norm pivots alone
    assert pivot_quota(0, 16, 10) == (0, 0, [])
    assert pivot_quota(9, 16, 0) == (4, 0, [2, 1, 1, 1])  # no text after the image: image pivots only
    for kept in range(20):
        p_img, _, quota = pivot_quota(kept, 16, 5)
        assert p_img + sum(quota) == min(kept, 16)


# -- the engine's layer view -----------------------------------------------------------------------------------


def reference_signals(model, inputs, layer):
    """Layer ``layer``'s post-RoPE keys [B, S, H_kv·hd] and output through the final norm [B, S, D], from the
    uncompressed model (its cache and hidden states)."""
    out = model(**inputs, use_cache=True, output_hidden_states=True)
    keys = compat.layer_keys(compat.cache_of_output(out), layer)
    b, h, s, hd = keys.shape
    normed = model.model.language_model.norm(out.hidden_states[layer + 1])
    return keys.transpose(1, 2).reshape(b, s, h * hd), normed


@dataclasses.dataclass
class Probe(PrefillPruner):
    """Layer 1 processes every other visual token (``thin``) or all; records what layer 1's view gives."""

    name = "probe"
    thin: bool = True
    seen: dict = dataclasses.field(default_factory=dict)

    def scoring_layers(self, num_layers):
        return (1,)

    def layer_tokens(self, layer, ctx, hidden):
        if layer != 1 or not self.thin:
            return None
        rank = torch.cumsum(ctx.visual.long(), dim=1)
        return ~ctx.visual | (rank % 2 == 0)

    def after_layer(self, layer, ctx, attention):
        self.seen.update(keys=attention.keys(), out=attention.output(), normed=attention.output(normed=True),
                         rows=attention(ctx.last_token))


def test_layer_view_gives_keys_at_prompt_positions_and_the_normed_output(deep, batch):
    probe = Probe(budget=1.0)
    compress(deep, method=probe)
    cache = compat.cache_of_output(deep(**batch, use_cache=True))
    seen, slots = probe.seen, deep.compression.prefill.slots
    visual = batch["input_ids"] == deep.config.image_token_id
    skipped = visual & (torch.cumsum(visual.long(), dim=1) % 2 == 1)
    processed = ~skipped & batch["attention_mask"].bool()  # (padding embeds to zero keys)
    assert (seen["keys"][skipped] == 0).all() and (seen["keys"][processed].abs().sum(-1) > 0).all()
    cached = compat.layer_keys(cache, 1)  # [B, H_kv, n, hd] in slot order
    b, h, n, hd = cached.shape
    flat = cached.transpose(1, 2).reshape(b, n, h * hd)
    for i in range(b):
        positions = slots.positions[1][i]
        assert torch.equal(seen["keys"][i, positions[positions >= 0]], flat[i, positions >= 0])
    torch.testing.assert_close(seen["normed"], deep.model.language_model.norm(seen["out"]), rtol=0, atol=0)
    assert seen["rows"].shape == (b, 1, batch["input_ids"].shape[1])  # still callable as row attention


def test_layer_view_matches_the_uncompressed_model_at_a_full_layer(deep, batch):
    keys, normed = reference_signals(deep, batch, 1)
    probe = Probe(budget=1.0, thin=False)
    compress(deep, method=probe)
    deep(**batch)
    torch.testing.assert_close(probe.seen["keys"], keys, rtol=0, atol=0)
    torch.testing.assert_close(probe.seen["normed"], normed, rtol=0, atol=0)


# -- DART through the engine -----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.875, 0.8])  # n = 12 (T=1 each) and n = 10 (remainder: image pivots only)
def test_engine_selection_equals_the_reference_on_the_models_own_signals(deep, batch, budget):
    keys, normed = reference_signals(deep, batch, 1)
    compress(deep, budget=budget, method="dart")
    deep(**batch)
    ctx = deep.compression.prefill.ctx
    n = int(ratio_budget_count(budget, torch.tensor([N]), torch.tensor([1]), 2, LAYERS))
    for b in range(3):
        image = ctx.visual[b].nonzero().squeeze(1)
        text = ctx.text_after_image[b].nonzero().squeeze(1)
        assert text.numel() >= 4 and image.min() > 0 and text.min() > image.max()
        p_img, p_txt, quota = pivot_quota(n, image.numel(), text.numel())
        expected = dart_select(normed[b], keys[b], image, text, p_img, p_txt, quota)
        assert (ctx.alive[b] & ctx.visual[b]).nonzero().squeeze(1).tolist() == expected.tolist()
        # layers from K on cache the kept tokens at their original positions (gaps), not at 0..n-1
        positions = deep.compression.prefill.slots.positions[2][b]
        assert positions[positions >= 0].tolist() == ctx.alive[b].nonzero().squeeze(1).tolist()


def test_counts_follow_the_layer_averaged_budget(deep, batch):
    compress(deep, budget=0.875, method="dart")  # n = 16·(0.875·4 − 2)/(4 − 2) = 12 = 4 + 8·1
    deep.generate(**batch, max_new_tokens=2, do_sample=False)
    stats = deep.compression.stats
    assert stats.layer_visual_tokens == [16.0, 16.0, 12.0, 12.0] and stats.layer_avg_visual_tokens == 0.875 * N
    assert stats.prefill_flops < stats.prefill_flops_full and stats.kv_cache_bytes < stats.kv_cache_bytes_full
    restore(deep)
    compress(deep, budget=13, method="dart")  # int: 13 per image on average → n = (13·4 − 2·16)/2 = 10
    deep(**batch)
    assert deep.compression.stats.layer_visual_tokens == [16.0, 16.0, 10.0, 10.0]
    restore(deep)
    compress(deep, method=DARTPruner(budget=0.6, per_pivot=1, layer=1))  # official fixed count: 4 + 8·1
    deep(**batch)
    assert deep.compression.stats.layer_visual_tokens == [16.0, 12.0, 12.0, 12.0]


def test_identity_at_full_budget(deep, batch):
    ref_logits, ref = deep(**batch).logits, deep.generate(**batch, **GREEDY)
    compress(deep, budget=1.0, method="dart")
    assert torch.equal(deep(**batch).logits, ref_logits)
    out = deep.generate(**batch, **GREEDY)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


def test_batch_equals_single(deep, processor, images, batch):
    assert (batch["attention_mask"][:, 0] == 0).any(), "fixture must be left-padded"
    compress(deep, budget=0.8, method="dart")
    assert_batch_equals_single(deep, processor, images, batch)


def test_restore_is_exact(deep, batch):
    ref = deep(**batch).logits
    state = {k: v.clone() for k, v in deep.state_dict().items()}
    compress(deep, budget=0.875, method="dart")
    assert not torch.equal(deep(**batch).logits, ref)
    restore(deep)
    assert torch.equal(deep(**batch).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in deep.state_dict().items())
    assert not any("forward" in layer.__dict__ for layer in deep.model.language_model.layers)


def test_several_images_are_ranked_as_one_span(deep, processor, images):
    text = ["USER: <image> and <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
    inputs = processor(images=[images[0], images[1], images[2]], text=text, return_tensors="pt", padding=True)
    compress(deep, budget=0.875, method="dart")
    deep(**inputs)
    ctx = deep.compression.prefill.ctx
    assert ctx.images.tolist() == [2, 1]
    assert (ctx.alive & ctx.visual).sum(dim=1).tolist() == [24, 12]  # 2·12 from one 32-token span


def test_unreachable_budgets_raise(deep):
    with pytest.raises(ValueError, match="lower `layer` or raise the budget"):
        compress(deep, budget=0.25, method="dart")  # K/L = 0.5
    with pytest.raises(ValueError, match="layer K must be in"):
        compress(deep, budget=0.9, method="dart", layer=LAYERS)
    with pytest.raises(ValueError, match="pivots_image"):
        DARTPruner(budget=0.9, pivots_image=0)
    assert not hasattr(deep, "compression")


# -- other families --------------------------------------------------------------------------------------------


def test_llava_next_selects_globally_over_the_packed_span(tokenizer):
    """Newlines included, one span per prompt; batch = single through generate (post-RoPE key norms depend on the
    absolute position, so the padding must not shift it: generate's position ids skip it, a bare forward does not)."""
    processor = build_next_processor(tokenizer)
    sizes = [(60, 80), (112, 50)]
    images = [random_images(1, size, seed=i)[0] for i, size in enumerate(sizes)]
    inputs = processor(images=images, text=PROMPTS[:2], return_tensors="pt", padding=True)
    model = build_llava_next(tokenizer, LlavaDims(text_layers=LAYERS))
    compress(model, budget=0.75, method="dart")
    out = model.generate(**inputs, **GREEDY)
    ctx = model.compression.prefill.ctx
    expected = ratio_budget_count(0.75, ctx.visual.sum(dim=1), ctx.images, 2, LAYERS)
    assert (ctx.alive & ctx.visual).sum(dim=1).tolist() == expected.tolist()
    assert model.compression.stats.layer_visual_tokens[2:] == [float(expected.sum()) / 2] * 2
    width = inputs["input_ids"].shape[1]
    for i, image in enumerate(images):  # AnyRes prompts of different lengths
        one = model.generate(**processor(images=[image], text=[PROMPTS[i]], return_tensors="pt"), **GREEDY)
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -3:])
        torch.testing.assert_close(out.logits[0][i], one.logits[0][0], rtol=1e-4, atol=1e-4)


def test_qwen2_vl_runs_through_the_same_engine(tokenizer):
    model = build_qwen(tokenizer, QwenDims(text_layers=LAYERS), kind="qwen2_vl")
    processor = build_qwen_processor(tokenizer)
    images = random_images(2, (40, 48)) + random_images(1, (24, 56), seed=1)
    prompts = ["USER: <image>\nwhat color is the square ? ASSISTANT:", "USER: <image> and <image>\nhow many ? ASSISTANT:"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ref = model.generate(**inputs, **GREEDY)
    compress(model, budget=1.0, method="dart")
    assert torch.equal(model.generate(**inputs, **GREEDY).sequences, ref.sequences)
    restore(model)
    compress(model, budget=0.75, method="dart")
    out = model.generate(**inputs, **GREEDY)
    assert out.sequences.shape == ref.sequences.shape
    ctx = model.compression.prefill.ctx
    expected = ratio_budget_count(0.75, ctx.visual.sum(dim=1), ctx.images, 2, LAYERS)
    assert (ctx.alive & ctx.visual).sum(dim=1).tolist() == expected.tolist()
