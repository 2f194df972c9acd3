"""Mechanics of compress/restore/compressed, parametrised over every registered method."""

import pytest
import torch
from conftest import GRID, PROMPTS, single

import vlm_compress
from vlm_compress import compress, compressed, list_methods, restore
from vlm_compress.budget import tokens_to_keep

# every method that runs on a random single-grid LLaVA: globalcom2 needs AnyRes, mqt trained weights (test_mqt.py)
METHODS = [m for m in list_methods("encoder") if m not in ("globalcom2", "mqt", "quota")]  # quota: test_quota.py
N = GRID * GRID


def greedy(model, inputs, steps=4):
    return model.generate(
        **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        return_dict_in_generate=True, output_logits=True,
    )


def expected_kept(method, budget):
    k = tokens_to_keep(budget, N)
    if method == "pool":  # largest aspect-preserving grid with at most k cells (pool.py docstring)
        side = int((GRID * (k / N) ** 0.5) + 1e-9)
        return max(1, side) ** 2
    if method == "m3":  # the largest nested scale within the budget: 4×4 → 16, 2×2 → 4, 1×1 → 1 tokens
        return max(c for c in (16, 4, 1) if c <= k or c == 1)
    return k


def hooks_of(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_full_budget(model, batch, method):
    ref_logits = model(**batch).logits
    ref_gen = greedy(model, batch)
    compress(model, budget=1.0, method=method)
    assert torch.equal(model(**batch).logits, ref_logits)
    out = greedy(model, batch)
    assert torch.equal(out.sequences, ref_gen.sequences)
    assert model.compression.stats.kept_per_image == [N] * 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 5, 1000])
def test_kept_count_matches_budget(model, batch, method, budget):
    compress(model, budget=budget, method=method)
    model(**batch)
    stats = model.compression.stats
    k = expected_kept(method, budget)
    assert stats.kept_per_image == [k] * 3
    assert stats.visual_tokens_kept == 3 * k and stats.visual_tokens_in == 3 * N
    # the LLM really received k placeholders per prompt
    ids = model.compression.last.input_ids
    assert ((ids == model.config.image_token_id).sum(dim=1) == k).all()
    removed = 3 * (N - k)
    assert stats.prompt_tokens_llm == stats.prompt_tokens_in - removed
    assert (stats.prefill_flops < stats.prefill_flops_full) == (k < N)


def test_budget_rounding():
    assert tokens_to_keep(0.2, 576) == 115  # 115.2
    assert tokens_to_keep(0.5, 3) == 2  # 1.5 rounds half up
    assert tokens_to_keep(0.001, 576) == 1
    assert tokens_to_keep(64, 576) == 64 and tokens_to_keep(1000, 576) == 576


@pytest.mark.parametrize("method", METHODS)
def test_generate_returns_callers_prompt(model, batch, method):
    compress(model, budget=0.25, method=method)
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (3, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single(model, processor, images, batch, method):
    assert (batch["attention_mask"][:, 0] == 0).any(), "fixture must be left-padded"
    compress(model, budget=0.25, method=method)
    out = greedy(model, batch)
    width = batch["input_ids"].shape[1]
    for i in range(3):
        one = greedy(model, single(processor, images, i))
        assert torch.equal(out.sequences[i, width:], one.sequences[0, one.sequences.shape[1] - 4 :])
        torch.testing.assert_close(out.logits[0][i], one.logits[0][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_exact(model, batch, method):
    ref = model(**batch).logits
    model.generate(**batch, max_new_tokens=2)  # transformers installs its own output-capturing hooks lazily
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs_before, hooks_before = set(model.__dict__), hooks_of(model)
    compress(model, budget=0.25, method=method)
    model(**batch)
    model.generate(**batch, max_new_tokens=2)
    restore(model)
    assert set(model.__dict__) == attrs_before and hooks_of(model) == hooks_before
    assert not hasattr(model, "compression")
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    after = model.state_dict()
    assert all(torch.equal(state_before[k], after[k]) for k in state_before)
    assert torch.equal(model(**batch).logits, ref)


@pytest.mark.parametrize("method", METHODS)
def test_compressed_scope_is_exact(model, batch, method):
    ref = model(**batch).logits
    with compressed(model, 0.25, method) as m:
        assert m is model and m(**batch).logits.shape[1] < ref.shape[1]
    assert torch.equal(model(**batch).logits, ref)
    with pytest.raises(RuntimeError):
        with compressed(model, 0.25, method):
            raise RuntimeError("boom")
    assert not hasattr(model, "compression")


def test_several_images_per_prompt(model, processor, images):
    text = ["USER: <image> and <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
    inputs = processor(images=[images[0], images[1], images[2]], text=text, return_tensors="pt", padding=True)
    compress(model, budget=0.25, method="random")
    out = greedy(model, inputs)
    stats = model.compression.stats
    assert stats.images == 3 and stats.kept_per_image == [4, 4, 4]
    ids = model.compression.last.input_ids
    assert (ids == model.config.image_token_id).sum(dim=1).tolist() == [8, 4]
    # per-prompt image rank seeds `random`: sample 0's second image differs from its first, sample 1 = single call
    kept = model.compression.last.selection.kept_index
    assert not torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])
    one = greedy(model, processor(images=[images[0], images[1]], text=[text[0]], return_tensors="pt"))
    assert torch.equal(out.sequences[0, -4:], one.sequences[0, -4:])


def test_text_only_prompt_is_untouched(model, tokenizer):
    inputs = tokenizer(["USER: what color ? ASSISTANT:", "USER: how many ? ASSISTANT:"], return_tensors="pt", padding=True)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    compress(model, budget=0.1, method="cls_attn")
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)
    assert model.compression.stats is None


def test_labels_follow_the_kept_tokens(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    compress(model, budget=0.25, method="cls_attn")
    out = model(**batch, labels=labels)
    new_ids = model.compression.last.input_ids
    assert out.logits.shape[1] == new_ids.shape[1] and torch.isfinite(out.loss)
    # recompute the loss by hand on the rewritten sequence: same labels as tokens where not padding
    new_labels = new_ids.masked_fill(model.compression.last.attention_mask == 0, -100)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), new_labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_right_padded_forward_keeps_padding_side(model, processor, images):
    processor.tokenizer.padding_side = "right"
    try:
        inputs = processor(images=images[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    compress(model, budget=0.25, method="random")
    model(**inputs)
    mask = model.compression.last.attention_mask
    assert mask[:, 0].all() and not mask[:, -1].all()


def test_stats_fields(model, batch):
    compress(model, budget=0.25, method="cls_attn")
    model(**batch)
    s = model.compression.stats
    assert s.kept_fraction == pytest.approx(0.25)
    assert 0 < s.flops_ratio < 1 and s.kv_cache_bytes < s.kv_cache_bytes_full
    assert s.select_ms >= 0 and s.encode_ms > 0
    assert s.layer_avg_visual_tokens == 4
    cfg = model.text_config if hasattr(model, "text_config") else model.config.text_config
    assert s.kv_cache_bytes == 2 * cfg.num_hidden_layers * s.prompt_tokens_llm * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4


def test_model_compression_exposes_config(model):
    compress(model, budget=0.3, method="visionzip", contextual_ratio=0.25)
    cfg = model.compression.config
    assert cfg.name == "visionzip" and cfg.budget == 0.3 and cfg.contextual_ratio == 0.25
    assert vlm_compress.MethodConfig.from_json(cfg.to_json()) == cfg
