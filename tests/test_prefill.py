"""The in-LLM stage: per-layer token plans, per-layer KV caches, row attention from q/k, FastV."""

import copy
import dataclasses

import pytest
import torch
from conftest import single

from vlm_compress import compat, compress, restore
from vlm_compress.budget import ratio_budget_count
from vlm_compress.pruners.fastv import FastVPruner, fastv_keep_fraction
from vlm_compress.pruners.llm_base import PrefillPruner
from vlm_compress.pruners.random import RandomPruner
from vlm_compress.testing import LlavaDims, build_llava

LAYERS = 4
N = 16  # visual tokens per image of the test model (4×4 grid)


@pytest.fixture()
def deep(tokenizer):
    """The test LLaVA with a 4-layer LLM (room for plans that differ per layer)."""
    return build_llava(tokenizer, LlavaDims(text_layers=LAYERS))


@dataclasses.dataclass
class EveryNth(PrefillPruner):
    """A plan fixed by position: layer l ≥ 1 processes the visual tokens whose rank is a multiple of l + 1.

    Not monotone (layer 2 keeps ranks 3, 6, ... that layer 1 skipped), and independent of the query, so a full
    recompute over prompt + generated tokens follows the same plan as cached decoding.
    """

    name = "every_nth"

    def layer_tokens(self, layer, ctx, hidden):
        if layer == 0:
            return None
        rank = torch.cumsum(ctx.visual.long(), dim=1)
        return ~ctx.visual | (rank % (layer + 1) == 0)


def plan_counts(layer):
    return N if layer == 0 else N // (layer + 1)


def greedy(model, inputs, steps=4):
    return model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )


@pytest.mark.parametrize("config", [EveryNth(budget=1.0), FastVPruner(budget=1.0)], ids=["keep-all-plan", "fastv"])
def test_plan_keeping_everything_is_identity(deep, batch, config):
    class KeepAll(EveryNth):
        def layer_tokens(self, layer, ctx, hidden):
            return torch.ones_like(ctx.visual)

    config = KeepAll(budget=1.0) if isinstance(config, EveryNth) else config
    ref_logits, ref = deep(**batch).logits, greedy(deep, batch)
    compress(deep, method=config)
    assert torch.equal(deep(**batch).logits, ref_logits)
    out = greedy(deep, batch)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    assert deep.compression.stats.layer_visual_tokens == [N] * LAYERS


# transformers 5.24 renamed the cache argument to `cache` (the old name still works there, deprecated)
@pytest.mark.parametrize("argument", sorted({"past_key_values", compat.CACHE_ARGUMENT}))
def test_cached_decode_equals_full_recompute(deep, batch, argument):
    compress(deep, method=EveryNth(budget=0.5))
    out = deep(**batch, use_cache=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = compat.cache_of_output(out)
    for _ in range(3):  # three cached steps
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        out = deep(input_ids=token, attention_mask=mask, use_cache=True, **{argument: cache})
    full = deep(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False)
    torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_each_layer_caches_what_it_processed(deep, batch):
    compress(deep, method=EveryNth(budget=0.5))
    cache = compat.cache_of_output(deep(**batch, use_cache=True))
    width = batch["input_ids"].shape[1]
    valid = batch["attention_mask"].sum(dim=1)
    slots = deep.compression.prefill.slots
    for layer in range(LAYERS):
        dropped = N - plan_counts(layer)
        # padded to the batch's width minus the tokens this layer skipped (same for every sample here)
        assert compat.layer_keys(cache, layer).shape[-2] == width - dropped
        assert slots.cached_tokens(layer).tolist() == (valid - dropped).tolist()
    assert deep.compression.stats.layer_visual_tokens == [float(plan_counts(i)) for i in range(LAYERS)]


@pytest.mark.parametrize("config", [EveryNth(budget=0.5), FastVPruner(budget=0.75)], ids=["every_nth", "fastv"])
def test_batch_equals_single(deep, processor, images, batch, config):
    assert (batch["attention_mask"][:, 0] == 0).any(), "fixture must be left-padded"
    compress(deep, method=config)
    out = greedy(deep, batch)
    width = batch["input_ids"].shape[1]
    for i in range(3):
        one = greedy(deep, single(processor, images, i))
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -4:])
        for step in range(4):
            torch.testing.assert_close(out.logits[step][i], one.logits[step][0], rtol=1e-4, atol=1e-4)


def test_sdpa_stays_and_no_attention_weights_are_requested(deep, batch):
    seen = []

    def check(module, args, kwargs, output):
        seen.append((kwargs.get("output_attentions"), output[1]))

    handles = [layer.self_attn.register_forward_hook(check, with_kwargs=True) for layer in deep.model.language_model.layers]
    compress(deep, budget=0.75, method="fastv")
    greedy(deep, batch, steps=2)
    assert deep.config.text_config._attn_implementation == "sdpa"
    assert seen and all(flag in (None, False) and weights is None for flag, weights in seen)
    for h in handles:
        h.remove()


def test_eager_attention_gives_the_same_plan_results(tokenizer, batch):
    sdpa = build_llava(tokenizer, LlavaDims(text_layers=LAYERS))
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    compress(sdpa, method=EveryNth(budget=0.5))
    compress(eager, method=EveryNth(budget=0.5))
    valid = batch["attention_mask"].bool()  # padding rows differ between the two kernels and are never read
    torch.testing.assert_close(eager(**batch).logits[valid], sdpa(**batch).logits[valid], rtol=1e-4, atol=1e-4)


@dataclasses.dataclass
class ReceivedProbe(EveryNth):
    """EveryNth's plan, recording at layers 0 and 2 ``attention.received`` of the layer's processed rows but the
    last, split in two groups (summed over every processed row), and of the last token plus visual rows the layer
    skipped (gathered, their queries projected again), beside ``attention(rows).sum(1)`` of each."""

    name = "received_probe"

    def scoring_layers(self, num_layers):
        return (0, 2)

    def after_layer(self, layer, ctx, attention):
        processed = (self.layer_tokens(layer, ctx, None) if layer else torch.ones_like(ctx.visual)) & ctx.valid
        most = processed & ~ctx.last_token
        skipped = ctx.visual & ctx.valid & ~processed
        few = ctx.last_token | (skipped & (torch.cumsum(skipped.long(), dim=1) <= 2))
        text, image = most & ~ctx.visual, most & ctx.visual
        groups = (text, image, few)
        received = attention.received(text, image) + attention.received(few)
        ctx.extras[layer] = received, tuple(attention(group).sum(dim=1) for group in groups)


def test_received_sums_the_rows_attention_on_both_paths(deep, batch):
    """``received`` equals the rows' attention summed, over all processed rows (most) or gathered rows (few), at a
    full layer (checked against eager's weights too) and at a pruned one, with left padding."""
    reference = copy.deepcopy(deep)
    reference.set_attn_implementation("eager")
    attentions = reference(**batch, output_attentions=True).attentions  # test side only
    compress(deep, method=ReceivedProbe(budget=0.5))
    deep(**batch)
    ctx = deep.compression.prefill.ctx
    for layer in (0, 2):
        received, summed = ctx.extras[layer]
        for got, want in zip(received, summed):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    processed = ctx.valid & ~ctx.last_token
    eager = (attentions[0].mean(dim=1) * processed[:, :, None]).sum(dim=1)
    torch.testing.assert_close(ctx.extras[0][0][0] + ctx.extras[0][0][1], eager, rtol=1e-4, atol=1e-5)
    for group in ctx.extras[2][0]:
        assert group.sum(dim=1).gt(0).all()  # each group's probabilities are there


def test_fastv_keeps_the_top_of_the_last_rows_attention_at_layer_k_minus_1(deep, batch):
    """Reference: the eager model's own attention weights (allowed in a test, never in the method)."""
    reference = copy.deepcopy(deep)
    reference.set_attn_implementation("eager")
    attentions = reference(**batch, output_attentions=True).attentions  # LLM layers
    visual = batch["input_ids"] == deep.config.image_token_id
    row = attentions[1][:, :, -1, :].mean(dim=1)  # layer K-1 = 1, last token (left padding: last column), head mean
    keep = round(N * fastv_keep_fraction(0.75, 2, LAYERS))  # 8
    expected = torch.zeros_like(visual)
    for b in range(3):
        cols = visual[b].nonzero().squeeze(1)
        expected[b, cols[row[b, cols].topk(keep).indices]] = True
    compress(deep, budget=0.75, method=FastVPruner(layer=2))
    deep(**batch)
    ctx = deep.compression.prefill.ctx
    assert torch.equal(ctx.alive & ctx.visual, expected)


def test_fastv_counts_follow_the_layer_averaged_budget(deep, batch):
    compress(deep, budget=0.75, method="fastv")  # K = 2 of 4 layers: n = 16·(0.75·4 − 2)/(4 − 2) = 8
    deep(**batch)
    stats = deep.compression.stats
    assert stats.layer_visual_tokens == [16.0, 16.0, 8.0, 8.0]
    assert stats.layer_avg_visual_tokens == 0.75 * N
    assert stats.prefill_flops < stats.prefill_flops_full and stats.kv_cache_bytes < stats.kv_cache_bytes_full
    restore(deep)
    compress(deep, budget=10, method="fastv")  # int: 10 per image on average → n = (10·4 − 2·16)/2 = 4
    deep(**batch)
    assert deep.compression.stats.layer_visual_tokens == [16.0, 16.0, 4.0, 4.0]
    restore(deep)
    compress(deep, method=FastVPruner(budget=0.2, ratio=0.25, layer=1))  # explicit R overrides the budget
    deep(**batch)
    assert deep.compression.stats.layer_visual_tokens == [16.0, 12.0, 12.0, 12.0]


def test_ratio_budget_count_formula():
    visual, images = torch.tensor([576, 100]), torch.tensor([1, 1])
    # budget 0.2 at K=2 of 32 layers: n = N(0.2·32 − 2)/30
    assert ratio_budget_count(0.2, visual, images, 2, 32).tolist() == [round(576 * 4.4 / 30), round(100 * 4.4 / 30)]
    assert ratio_budget_count(1000, visual, images, 2, 32).tolist() == [576, 100]  # capped at N


def test_fastv_rejects_unreachable_budgets(deep):
    with pytest.raises(ValueError, match="lower `layer`"):
        compress(deep, budget=0.25, method="fastv")  # K/L = 0.5
    with pytest.raises(ValueError, match="layer K must be in"):
        compress(deep, budget=0.9, method="fastv", layer=LAYERS)
    assert not hasattr(deep, "compression")


def test_fastv_ranks_several_images_together(deep, processor, images):
    text = ["USER: <image> and <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
    inputs = processor(images=[images[0], images[1], images[2]], text=text, return_tensors="pt", padding=True)
    compress(deep, budget=0.75, method="fastv")
    deep(**inputs)
    ctx = deep.compression.prefill.ctx
    assert ctx.images.tolist() == [2, 1]
    assert (ctx.alive & ctx.visual).sum(dim=1).tolist() == [16, 8]
    assert deep.compression.stats.images == 3


def test_text_only_prompt_runs_untouched(deep, processor):
    inputs = processor.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    ref = deep(**inputs).logits
    compress(deep, budget=0.75, method="fastv")
    assert torch.equal(deep(**inputs).logits, ref)
    assert deep.compression.stats is None


def test_stacked_with_an_encoder_method(deep, batch):
    compress(deep, method=[RandomPruner(budget=0.5), FastVPruner(budget=0.75)])
    out = greedy(deep, batch, steps=2)
    stats = deep.compression.stats
    assert stats.kept_per_image == [8, 8, 8]  # the encoder stage
    assert stats.layer_visual_tokens == [8.0, 8.0, 4.0, 4.0]  # FastV on what entered the LLM
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 2


def test_restore_removes_the_layer_wrappers(deep, batch):
    ref = deep(**batch).logits
    compress(deep, budget=0.75, method="fastv")
    deep(**batch)
    assert all("forward" in layer.__dict__ for layer in deep.model.language_model.layers)
    restore(deep)
    assert not any("forward" in layer.__dict__ for layer in deep.model.language_model.layers)
    assert torch.equal(deep(**batch).logits, ref)


def test_step_validity_is_kept_incrementally_and_equals_the_full_rebuild():
    """A decode step's mask from the incremental key validity equals :meth:`LayerSlots.allowed` built from scratch,
    before and after a cache edit, with left padding and a padded (-1) slot."""
    from vlm_compress.stages.prefill import LayerSlots

    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    slots = LayerSlots(positions=[torch.tensor([[0, 1, 3], [0, 2, -1]])], valid=valid, length=4, reshaped=True)
    for step in range(3):
        query = torch.full((2, 1), slots.length)
        slots.valid = torch.cat([slots.valid, torch.tensor([[True], [step != 1]])], dim=1)  # one padded step
        slots.positions[0] = torch.cat([slots.positions[0], query], dim=1)
        assert torch.equal(slots.step_allowed(0, query), slots.allowed(0, query))
        slots.length += 1
        if step == 1:  # an eviction: row 0 keeps positions 0, 3, 4, 5; row 1 keeps 2 and the padded step 5
            slots.positions[0] = torch.tensor([[0, 3, 4, 5], [2, 5, -1, -1]])
            slots.key_valid.pop(0)
    assert slots.key_valid[0].shape == slots.positions[0].shape
    assert slots.key_valid[0].tolist() == [[False, True, True, True, True], [True, False, False, False, True]]


@pytest.mark.parametrize("spec", ["fastv", "atp", "mustdrop_llm", "h2o"])
def test_scoring_reuses_each_layers_own_queries(deep, batch, spec):
    """Row attention at a scoring layer takes the queries the layer itself projected: q_proj runs once per layer
    and call, prompt or decode step, never again for the scores (ATP scores every visual row: that projection
    was a fifth of its prefill)."""
    options = {"atp": {"heads": None}, "fastv": {"layer": 1}}.get(spec, {})
    compress(deep, budget=0.5, method=spec, **options)
    calls = []
    for i, layer in enumerate(deep.model.language_model.layers):
        layer.self_attn.q_proj.register_forward_hook(lambda module, args, out, i=i: calls.append((i, args[0].shape[1])))
    greedy(deep, batch, steps=3)
    per_layer = [sum(1 for c in calls if c[0] == i) for i in range(LAYERS)]
    assert per_layer == [3] * LAYERS  # the prompt and two fed steps


def test_decode_steps_over_unpadded_caches_take_the_stock_unmasked_path(deep, processor, images, batch):
    """A one-token step over a cache with no padding slot needs no mask (every slot precedes the query), so the
    layer gets none, as the stock model's decode does; a padded batch still gets one. (That both paths give the
    same logits is what the batch-equals-single tests check.)"""
    compress(deep, budget=0.5, method="fastv", layer=1)
    masks = []
    def seen(module, args, kwargs):  # what the stage hands the attention inside the original layer
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden.shape[1] == 1:
            masks.append(kwargs.get("attention_mask"))

    hook = deep.model.language_model.layers[2].self_attn.register_forward_pre_hook(seen, with_kwargs=True)
    greedy(deep, single(processor, images, 0), steps=4)
    assert len(masks) == 3 and all(m is None for m in masks)
    masks.clear()
    greedy(deep, batch, steps=4)
    hook.remove()
    assert len(masks) == 3 and all(m is not None and m.shape[-1] > 0 for m in masks)


# -- decode stage: h2o ------------------------------------------------------------------------------------------


def cached_visual(model, layer):
    """[B] visual tokens in layer ``layer``'s cache after the last call."""
    stage = model.compression.prefill
    positions = stage.slots.positions[layer]
    visual = stage.ctx.visual & stage.ctx.valid
    visual = torch.nn.functional.pad(visual, (0, int(positions.max()) + 1 - visual.shape[1]))  # generated: text
    return ((positions >= 0) & torch.gather(visual, 1, positions.clamp(min=0))).sum(dim=1)


def test_h2o_leaves_the_prefill_alone_and_evicts_to_the_budget(deep, batch):
    ref = greedy(deep, batch)
    compress(deep, budget=0.25, method="h2o", rolling=False)
    out = greedy(deep, batch)
    assert torch.equal(out.logits[0], ref.logits[0])  # the prompt's prefill is untouched
    for layer in range(LAYERS):
        assert cached_visual(deep, layer).tolist() == [4, 4, 4]
    stats = deep.compression.stats
    assert stats.prefill_flops == stats.prefill_flops_full  # the prefill is not shortened
    assert stats.kv_cache_bytes < stats.kv_cache_bytes_full  # what decoding starts from
    assert stats.kv_cache_bytes_decode > stats.kv_cache_bytes  # plus the generated tokens
    restore(deep)
    compress(deep, budget=1.0, method="h2o")
    assert torch.equal(greedy(deep, batch).sequences, ref.sequences)


def test_h2o_keeps_the_most_attended_visual_slots(deep, batch):
    reference = copy.deepcopy(deep)
    reference.set_attn_implementation("eager")
    attentions = reference(**batch, output_attentions=True).attentions
    compress(deep, budget=0.25, method="h2o")
    deep(**batch, use_cache=True)
    ctx, slots = deep.compression.prefill.ctx, deep.compression.prefill.slots
    rows = ctx.text_after_image | ctx.last_token
    for layer in (0, LAYERS - 1):
        received = (attentions[layer].mean(dim=1) * rows[:, :, None]).sum(dim=1)  # [B, S]
        for b in range(3):
            cols = ctx.visual[b].nonzero().squeeze(1)
            expected = set(cols[received[b, cols].topk(4).indices].tolist())
            kept = {p for p in slots.positions[layer][b].tolist() if p >= 0 and bool(ctx.visual[b, p])}
            assert kept == expected


@pytest.mark.parametrize("rolling", [True, False])
def test_h2o_batch_equals_single(deep, processor, images, batch, rolling):
    compress(deep, budget=0.5, method="h2o", window=2, rolling=rolling)
    steps = 24
    out = greedy(deep, batch, steps)
    width = batch["input_ids"].shape[1]
    for i in range(3):
        one = greedy(deep, single(processor, images, i), steps)
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -steps:])
        torch.testing.assert_close(out.logits[-1][i], one.logits[-1][0], rtol=1e-4, atol=1e-4)


def test_h2o_batch_with_different_image_counts_equals_single(deep, processor, images):
    """Rows holding two images and one: each row evicts its own visual slots, and every decode step's logits equal
    the row's alone (a cache argument the engine does not see gives silently wrong logits here)."""
    from vlm_compress.stats import kv_entry_bytes

    texts = ["USER: <image> and <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
    per_row = [[images[0], images[1]], [images[2]]]
    batch = processor(images=per_row[0] + per_row[1], text=texts, return_tensors="pt", padding=True)
    compress(deep, budget=0.25, method="h2o", rolling=False)
    steps = 4
    out = greedy(deep, batch, steps)
    for layer in range(LAYERS):
        assert cached_visual(deep, layer).tolist() == [8, 4]  # a quarter of 2 × 16 and of 16
    stats = deep.compression.stats
    generated = (steps - 1) * 2 * LAYERS * kv_entry_bytes(deep.config.text_config, 4)  # the last token is not fed
    assert stats.kv_cache_bytes_decode - stats.kv_cache_bytes == generated
    width = batch["input_ids"].shape[1]
    for i in range(2):
        one = greedy(deep, processor(images=per_row[i], text=[texts[i]], return_tensors="pt"), steps)
        assert torch.equal(out.sequences[i, width:], one.sequences[0, -steps:])
        for step in range(steps):
            torch.testing.assert_close(out.logits[step][i], one.logits[step][0], rtol=1e-4, atol=1e-4)


class CacheSizes:
    """A logits processor recording every layer's non-padding cache slots per row after each forward: [L][B]."""

    def __init__(self, model):
        self.stage, self.sizes = model.compression.prefill, []

    def __call__(self, input_ids, scores):
        self.sizes.append([self.stage.slots.cached_tokens(layer).tolist() for layer in range(LAYERS)])
        return scores


def test_h2o_rolling_holds_the_cache_at_its_budget_for_100_tokens(deep, batch):
    """Visual budget 8 of 16 per layer; 100 generated tokens later every layer still holds the prompt's text plus 8
    slots, the recent window is all there, and old generated tokens were evicted too (they are eligible)."""
    from transformers import LogitsProcessorList

    window = 4
    compress(deep, budget=0.5, method="h2o", window=window)
    sizes = CacheSizes(deep)
    greedy_kwargs = dict(max_new_tokens=100, min_new_tokens=100, do_sample=False)
    deep.generate(**batch, **greedy_kwargs, logits_processor=LogitsProcessorList([sizes]))
    stage = deep.compression.prefill
    text = (batch["attention_mask"].bool() & (batch["input_ids"] != deep.config.image_token_id)).sum(dim=1)
    assert len(sizes.sizes) == 100
    assert all(step == [(text + 8).tolist()] * LAYERS for step in sizes.sizes)
    stats = deep.compression.stats
    assert stats.kv_cache_bytes_decode == stats.kv_cache_bytes  # held, not grown
    s, length = stage.ctx.visual.shape[1], stage.slots.length
    for layer in range(LAYERS):
        positions = stage.slots.positions[layer]
        assert all(set(range(length - window, length)) <= set(row.tolist()) for row in positions)
        generated = (positions >= s).sum(dim=1)
        assert bool((generated < length - s).all())  # some generated tokens are gone...
        assert bool((generated >= window).all())  # ...but not the recent ones


@torch.no_grad()
def test_h2o_rolling_holds_the_budget_when_several_tokens_are_fed_at_once(deep, batch):
    """Steps of 1, 3 and 2 tokens (a user's own loop, speculative-style chunks): the unobserved new slots start at a
    score of 0 and each row drops as many slots as it gained."""
    compress(deep, budget=0.5, method="h2o", window=2)
    stage = deep.compression.prefill
    out = deep(**batch, use_cache=True)
    capacity = [stage.slots.cached_tokens(layer).tolist() for layer in range(LAYERS)]
    cache, mask = compat.cache_of_output(out), batch["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    for n in (1, 3, 1, 2, 1):
        tokens = torch.randint(5, 50, (3, n), generator=generator)
        mask = torch.cat([mask, torch.ones_like(tokens)], 1)
        deep(input_ids=tokens, attention_mask=mask, use_cache=True, **{compat.CACHE_ARGUMENT: cache})
        assert [stage.slots.cached_tokens(layer).tolist() for layer in range(LAYERS)] == capacity


@torch.no_grad()  # as generate runs: the cache edits are in place then
def test_h2o_rolling_evicts_the_least_accumulated_slot(deep, batch):
    """Each decode step drops, per layer and row, the eligible slot (visual, or generated and older than the window)
    whose accumulated head-mean attention — the question rows' at the prompt, plus every step's query since — is
    lowest. The attention comes from the eager model's own weights (``output_attentions``, test side only)."""
    window = 2
    deep.set_attn_implementation("eager")
    compress(deep, budget=0.5, method="h2o", window=window)
    stage = deep.compression.prefill
    out = deep(**batch, use_cache=True, output_attentions=True)
    ctx, slots = stage.ctx, stage.slots
    s = ctx.visual.shape[1]
    rows = (ctx.text_after_image | ctx.last_token).float()
    accumulated = []  # [L][B] {position: score}
    for layer in range(LAYERS):
        prompt = (out.attentions[layer].mean(dim=1) * rows[:, :, None]).sum(dim=1)  # [B, S]
        accumulated.append([{p: float(prompt[b, p]) for p in slots.positions[layer][b].tolist() if p >= 0}
                            for b in range(3)])
    cache = compat.cache_of_output(out)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(12):
        before = [slots.positions[layer].clone() for layer in range(LAYERS)]
        new = slots.length
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = deep(input_ids=token, attention_mask=mask, use_cache=True, output_attentions=True,
                   **{compat.CACHE_ARGUMENT: cache})
        for layer in range(LAYERS):
            weights = out.attentions[layer].mean(dim=1)[:, 0]  # [B, K + 1] over the slots before, then the new one
            for b in range(3):
                scores = accumulated[layer][b]
                scores[new] = 0.0
                for slot, position in enumerate(before[layer][b].tolist() + [new]):
                    if position >= 0:
                        scores[position] += float(weights[b, slot])
                eligible = [p for p in scores if (p >= s or bool(ctx.visual[b, p])) and p < new + 1 - window]
                dropped = min(eligible, key=lambda p: scores[p])
                del scores[dropped]
                kept = {p for p in slots.positions[layer][b].tolist() if p >= 0}
                assert kept == set(scores), (layer, b, dropped)
        token = out.logits[:, -1].argmax(-1, keepdim=True)


def test_h2o_rolling_beam_search_follows_each_beam(deep, processor, images):
    """Beams evict differently once generated tokens compete; beam search must move the slot bookkeeping and the
    scores with the cache rows. The best beam's per-step log-probs equal those of the same tokens forced through the
    compressed model alone (whose evictions follow that beam's history only)."""
    with torch.no_grad():  # sharper attention than the random init's near-uniform one: the beams' evictions diverge
        for layer in deep.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
    inputs = single(processor, images, 2)
    compress(deep, budget=0.25, method="h2o", window=2)
    steps = 30
    out = deep.generate(**inputs, num_beams=3, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                        output_scores=True, return_dict_in_generate=True)
    beams = deep.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)[0]
    width = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, width:]
    step = deep(**inputs, use_cache=True)
    cache, mask, forced = compat.cache_of_output(step), inputs["attention_mask"], []
    for t in range(steps):
        forced.append(torch.log_softmax(step.logits[0, -1].float(), dim=-1)[tokens[t]])
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        step = deep(input_ids=tokens[None, t : t + 1], attention_mask=mask, use_cache=True,
                    **{compat.CACHE_ARGUMENT: cache})
    torch.testing.assert_close(torch.stack(forced), beams[:steps].float(), rtol=1e-4, atol=1e-4)


def test_h2o_rolling_step_scoring_is_timed_apart_from_the_prompts(deep, batch):
    compress(deep, budget=0.5, method="h2o", window=2)
    deep(**batch, use_cache=True)
    assert deep.compression.stats.decode_select_ms == 0.0  # a prompt alone: no decode step yet
    deep.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    stats = deep.compression.stats
    assert stats.decode_select_ms > 0 and stats.decode_select_ms == deep.compression.prefill.record.step_select_s * 1e3


# -- MustDrop stages 2 and 3 ---------------------------------------------------------------------------------------


def hand_context(visual_count=6, text=2):
    from vlm_compress.pruners.llm_base import PrefillContext

    s = 1 + visual_count + text
    visual = torch.zeros(1, s, dtype=torch.bool)
    visual[0, 1 : 1 + visual_count] = True
    return PrefillContext(
        visual=visual, valid=torch.ones_like(visual), alive=torch.ones_like(visual),
        protected=torch.zeros_like(visual), images=torch.tensor([1]), num_layers=32,
    )


def test_mustdrop_official_rule_drops_low_global_and_low_individual():
    from vlm_compress.pruners.mustdrop_llm import MustDropLLMPruner

    ctx = hand_context()
    rows = torch.zeros(1, 2, ctx.visual.shape[1])  # two text rows after the image; visual tokens at 1..6
    rows[0, :, 1:7] = torch.tensor([[0.30, 0.001, 0.001, 0.2, 0.0, 0.02], [0.30, 0.001, 0.02, 0.2, 0.0, 0.0]])
    ctx.protected[0, 5] = True  # the key set: never dropped
    pruner = MustDropLLMPruner(budget=0.5, mode="official", global_thr=0.01, individual_thr=0.015)
    pruner.after_layer(2, ctx, lambda r: rows)
    # g = [.6, .002, .021, .4, 0, .02], Σ = 1.043 → g < 0.01043 for tokens 2 and 5 (5 protected);
    # token 3 has g .021 ≥ .0104; token 6 has g .02 ≥ .0104 → only token 2 dropped
    assert (ctx.alive & ctx.visual)[0, 1:7].tolist() == [True, False, True, True, True, True]


def test_mustdrop_budget_mode_meets_the_layer_average(deep, batch):
    from vlm_compress.pruners.mustdrop_llm import MustDropLLMPruner, stage_keep_share

    rho = stage_keep_share(0.5, [1, 2, 3], 4)
    assert abs((1 + rho + rho**2 + rho**3) / 4 - 0.5) < 1e-9
    compress(deep, method=MustDropLLMPruner(budget=0.5))
    cache = compat.cache_of_output(deep(**batch, use_cache=True))
    stats = deep.compression.stats
    assert abs(stats.layer_avg_visual_tokens - 0.5 * N) <= 0.5  # per-stage rounding
    first = deep.compression.config.scoring_layers(LAYERS)[0]
    final = stats.layer_visual_tokens[-1]
    for layer in range(first, LAYERS):  # stage 3: every cache from the first scoring layer holds the final set
        assert cached_visual(deep, layer).tolist() == [final] * 3
    assert compat.layer_keys(cache, LAYERS - 1).shape[-2] == compat.layer_keys(cache, first).shape[-2]


def test_mustdrop_key_set_from_stage_1_survives_stage_2(deep, batch):
    compress(deep, method=["mustdrop", "mustdrop_llm"], budget=0.5)
    deep(**batch)
    ctx = deep.compression.prefill.ctx
    assert ctx.protected.any(dim=1).all()
    assert not (ctx.protected & ~ctx.alive).any()
