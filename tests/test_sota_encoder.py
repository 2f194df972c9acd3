"""DivPrune, CDPruner and SCOPE: hand-checked cases of the reference (sota-methods.md §1, §2, §4), then the stock
models."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import PROMPTS, single

from vlm_compress import compress, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.adapters.base import ImageBatch, TokenLayout
from vlm_compress.budget import apportion, tokens_to_keep
from vlm_compress.pruners.base import EncoderContext
from vlm_compress.pruners.cdpruner import CDPrunerPruner, dpp_greedy, dpp_select, relevance_from_cosines, unit
from vlm_compress.pruners.divprune import DivPrunePruner, max_min_diversity
from vlm_compress.pruners.scope import ScopePruner, coverage_greedy
from vlm_compress.testing import (
    LlavaDims, build_llava_next, build_next_processor, build_onevision, build_onevision_processor, build_qwen,
    build_qwen_processor, random_images,
)

METHODS = ["divprune", "cdpruner", "scope"]
# the reference's four tokens (§1 and §2 "Smallest CPU test")
X = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.6, 0.6, 0.5]])


def context(features, keep, instruction_ids=None, embed_tokens=None, vision=None):
    """A hand-built single-grid context over ``features`` [I, N, D] (no tower: no CLS, no attention)."""
    i, n, _ = features.shape
    images = ImageBatch(features=features, vision_features=vision if vision is not None else features,
                        layout=TokenLayout.single_grid((1, n)), source=torch.arange(i)[:, None] * n + torch.arange(n),
                        tower_length=n, project=lambda x: x)
    return EncoderContext(images=images, keep=[keep] * i, image_index_in_prompt=list(range(i)), capture=None,
                          instruction_ids=instruction_ids, embed_tokens=embed_tokens)


def instruction(inputs, image_token_id):
    """``[T]`` the text after the (single prompt's) last image placeholder."""
    ids = inputs["input_ids"][0]
    return ids[int((ids == image_token_id).nonzero().max()) + 1:]


# ---- DivPrune: the formula --------------------------------------------------------------------------------------
def test_divprune_reference_case():
    assert max_min_diversity(X, 3).tolist() == [2, 0, 3]  # step scores (.0050,.0050,.3908,.3332), (1,.9005,0,.3908), ...
    sel = DivPrunePruner(budget=3).select(context(X[None], 3))
    assert sel.kept_index[0].tolist() == [0, 2, 3]
    assert torch.equal(sel.features[0], X[[0, 2, 3]])


def test_divprune_on_an_arc():
    """Unit vectors at 0°,10°,20°,30°,40°,80°: the isolated 80° first, then the far end, then the middles."""
    angles = torch.tensor([0.0, 10, 20, 30, 40, 80]) * math.pi / 180
    points = torch.stack([angles.cos(), angles.sin()], 1)
    assert max_min_diversity(points, 4).tolist() == [5, 0, 4, 2]
    assert sorted(max_min_diversity(points, 10).tolist()) == list(range(6))  # capped at N, every token once


def test_divprune_duplicates_ties_to_lowest_index_and_no_repeats():
    same = torch.ones(5, 3)
    assert max_min_diversity(same, 3).tolist() == [0, 1, 2]
    pairs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    order = max_min_diversity(pairs, 3).tolist()
    assert order[:2] == [0, 2] and len(set(order)) == 3


# ---- CDPruner: the formula ---------------------------------------------------------------------------------------
def test_dpp_greedy_reference_case():
    rel = torch.tensor([1.0, 0.9, 0.5, 0.2])
    kernel = rel[:, None] * (unit(X) @ unit(X).T) * rel[None, :]
    assert dpp_greedy(kernel, 3).tolist() == [0, 2, 3]  # residuals after step 0: (-inf, .0080, .25, .0252)
    assert dpp_select(X, rel, 3).tolist() == [0, 2, 3]
    assert dpp_greedy(kernel, 1).tolist() == [0]


def test_cdpruner_relevance_reference_case():
    cosines = torch.tensor([-0.2, -0.1, 0.1, 0.3])[:, None]
    rel = relevance_from_cosines(cosines, negate=True)  # the official -cos: the most text-similar token gets ~0
    torch.testing.assert_close(rel, torch.tensor([1.0, 0.8, 0.4, 2e-6]), atol=1e-5, rtol=0)
    assert 0 < float(rel[3]) < 1e-5
    assert dpp_select(X, rel, 2).tolist() == [0, 2]
    flipped = relevance_from_cosines(cosines, negate=False)
    assert int(flipped.argmax()) == 3 and float(flipped[0]) < 1e-5
    # the mean over segments comes first; constant or missing text: uniform
    two = torch.stack([cosines[:, 0], 3 * cosines[:, 0]], 1)
    torch.testing.assert_close(relevance_from_cosines(two, True), rel)
    assert torch.equal(relevance_from_cosines(torch.ones(4, 2), True), torch.ones(4))
    assert torch.equal(relevance_from_cosines(torch.ones(4, 0), True), torch.ones(4))


def test_dpp_guard_fills_by_relevance_without_nan():
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    rel = torch.tensor([0.5, 0.9, 0.8, 0.7, 0.6])
    order = dpp_select(tokens, rel, 5)
    # picks 1 (L_ii = .81) and 2 (.64); the kernel has rank 2, so the rest go by L_ii = rel²·|cos|: 3, 0, then the
    # zero vector (L_ii = 0)
    assert order.tolist() == [1, 2, 3, 0, 4]
    assert sorted(order.tolist()) == list(range(5))


def test_cdpruner_relevance_from_llm_embeddings():
    torch.manual_seed(0)
    feats, table = torch.randn(2, 6, 4), torch.randn(10, 4)
    ids = [torch.tensor([3, 7, 1]), torch.tensor([], dtype=torch.long)]
    ctx = context(feats, 3, ids, lambda t: table[t])
    sel = CDPrunerPruner(budget=3).select(ctx)
    rel0 = relevance_from_cosines(unit(feats[0]) @ unit(table[ids[0]]).T, negate=True)  # the official sign
    assert sel.kept_index[0].tolist() == dpp_select(feats[0], rel0, 3).sort().values.tolist()
    # no text after the image: uniform relevance, pure diversity over the cosine kernel
    assert sel.kept_index[1].tolist() == dpp_select(feats[1], torch.ones(6), 3).sort().values.tolist()
    flipped = CDPrunerPruner(budget=3, negate=False).select(ctx)
    rel_pos = relevance_from_cosines(unit(feats[0]) @ unit(table[ids[0]]).T, negate=False)
    assert flipped.kept_index[0].tolist() == dpp_select(feats[0], rel_pos, 3).sort().values.tolist()
    # hand-built contexts without the text fields: uniform
    assert CDPrunerPruner(budget=3).select(context(feats, 3)).kept_index[1].tolist() == sel.kept_index[1].tolist()


# ---- SCOPE: the formula ------------------------------------------------------------------------------------------
def test_scope_reference_case():
    saliency = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # step gains (column sums of max(0, S)) × a = (.2604, 1.1045, .3417, .8656) → 1; then (.0005, -, .1801, .2529)
    # → 3; then (.0005, -, .0782, -) → 2 (§4)
    assert coverage_greedy(X, saliency, 3).tolist() == [1, 3, 2]
    # "add": gains + a. Step 0: column sums (2.604, 2.761, 1.708, 2.885) + a → 3 (3.185); the rest by hand below
    similarity = unit(X) @ unit(X).T
    covered, order = torch.zeros(4), []
    for _ in range(3):
        score = (similarity - covered[:, None]).clamp_min(0).sum(0) + saliency
        score[order] = float("-inf")
        j = int(score.argmax())
        order.append(j)
        covered = torch.maximum(covered, similarity[j])
    assert coverage_greedy(X, saliency, 3, combine="add").tolist() == order and order[0] == 3
    # α = 0: saliency plays no part, pure coverage (the most central token first)
    assert coverage_greedy(X, saliency, 1, alpha=0.0).tolist() == [3]


def test_scope_through_the_stage_uses_tower_features_and_summed_cls_attention(model, processor, images):
    one = single(processor, images, 1)
    adapter = get_adapter(model)
    compress(model, budget=5, method="scope")
    with torch.no_grad():
        model(**one)
    kept = model.compression.last.selection.kept_index[0]
    restore(model)
    capture = adapter.capture({-2: adapter.vision_attention(-2)}, False, {})
    with capture, torch.no_grad():
        batch = adapter.encode_images(one["pixel_values"])[0]
    ctx = EncoderContext(images=batch, keep=[5], image_index_in_prompt=[0], capture=capture)
    saliency = ctx.cls_attention(-2, "sum", "probs")[0]
    assert torch.equal(kept, coverage_greedy(batch.vision_features[0], saliency, 5).sort().values)


def test_full_budget_keeps_everything_in_order():
    feats = torch.randn(2, 5, 3)
    for pruner in (DivPrunePruner(budget=1.0), CDPrunerPruner(budget=1.0), ScopePruner(budget=1.0)):
        sel = pruner.select(context(feats, 5))
        assert [k.tolist() for k in sel.kept_index] == [list(range(5))] * 2
        assert torch.equal(torch.stack(sel.features), feats)


# ---- the stock single-grid LLaVA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_identity_restore_and_counts(model, batch, method):
    n = 16
    with torch.no_grad():
        ref = model(**batch).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        compress(model, budget=1.0, method=method)
        assert torch.equal(model(**batch).logits, ref)
        restore(model)
        for budget in (0.5, 0.25, 5, 1000):
            compress(model, budget=budget, method=method)
            model(**batch)
            k = tokens_to_keep(budget, n)
            assert model.compression.stats.kept_per_image == [k] * 3
            kept = model.compression.last.selection.kept_index
            assert all(bool((idx.diff() > 0).all()) and idx.numel() == k for idx in kept)
            restore(model)
        assert torch.equal(model(**batch).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__ and not hasattr(model, "compression")


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single(model, processor, images, method):
    texts = PROMPTS[:2]
    both = processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    assert (both["attention_mask"][:, 0] == 0).any()
    compress(model, budget=0.25, method=method)
    with torch.no_grad():
        batched = model(**both).logits[:, -1]
        kept = [k.clone() for k in model.compression.last.selection.kept_index]
        assert not torch.equal(kept[0], kept[1])  # two images, two selections
        for i in range(2):
            one = model(**single(processor, images, i)).logits[:, -1]
            assert torch.equal(model.compression.last.selection.kept_index[0], kept[i])
            torch.testing.assert_close(one, batched[i : i + 1], rtol=1e-4, atol=1e-5)
    restore(model)


def test_cdpruner_reads_the_prompt_after_the_image(model, processor, images):
    """Through the stage: relevance from the LLM's own embeddings of the question and ``ASSISTANT:``."""
    one = single(processor, images, 2)
    with torch.no_grad():
        features = get_adapter(model).encode_images(one["pixel_values"])[0].features[0]
        text = model.get_input_embeddings()(instruction(one, model.config.image_token_id))
    rel = relevance_from_cosines(unit(features) @ unit(text).T, negate=True)
    expected = dpp_select(features, rel, 4).sort().values
    compress(model, budget=4, method="cdpruner")
    with torch.no_grad():
        model(**one)
    assert torch.equal(model.compression.last.selection.kept_index[0], expected)
    restore(model)


# ---- LLaVA-NeXT (AnyRes) -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_setup(tokenizer):
    processor = build_next_processor(tokenizer)
    images = [random_images(1, size, seed=i)[0] for i, size in enumerate([(60, 80), (112, 50)])]
    inputs = processor(images=images, text=PROMPTS[:2], return_tensors="pt", padding=True)
    return build_llava_next(tokenizer), inputs


def test_next_counts_parts_and_newlines(next_setup):
    model, inputs = next_setup
    batches = get_adapter(model).encode_images(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        ref = model(**inputs).logits
        for method in METHODS:
            compress(model, 1.0, method)
            assert torch.equal(model(**inputs).logits, ref)
            restore(model)
        for budget in (0.25, 7):
            compress(model, budget, "divprune")
            model(**inputs)
            divprune = model.compression.last.selection.kept_index
            assert model.compression.stats.kept_per_image == [tokens_to_keep(budget, b.layout.num_tokens) for b in batches]
            restore(model)
            per_part = {}
            for method in ("cdpruner", "scope"):
                compress(model, budget, method)
                model(**inputs)
                per_part[method] = model.compression.last.selection.kept_index
                assert model.compression.stats.kept_per_image == [tokens_to_keep(budget, b.layout.num_tokens)
                                                                  for b in batches]
                assert model.compression.stats.newlines_kept == 0
                restore(model)
            for images, index, scope, global_index in zip(batches, per_part["cdpruner"], per_part["scope"], divprune):
                layout, k = images.layout, tokens_to_keep(budget, images.layout.num_tokens)
                assert not layout.newline[index].any()  # cdpruner: newlines are never chosen
                parts = [layout.tokens_of(0)] + [(layout.crop == c).nonzero().squeeze(1)
                                                 for c in sorted(set(layout.crop[layout.partition == 1].tolist()))]
                sizes = [p.numel() for p in parts]
                for chosen in (index, scope):  # T split over thumbnail and crops by size
                    assert [int(torch.isin(chosen, p).sum()) for p in parts] == apportion(k, sizes, sizes)
                assert not layout.newline[scope].any()
                # divprune: global over the whole packed image, newlines included as candidates
                expected = max_min_diversity(images.features[0], k).sort().values
                assert torch.equal(global_index, expected)


# ---- CDPruner with a CLIP text tower -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dirs(tokenizer, tmp_path_factory):
    """A tiny HF CLIPModel (vision width = the test LLaVA's, 32) with a small tokenizer, and the LLM's tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": tokenizer.eos_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": LlavaDims().vision_hidden, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
        projection_dim=12,
    )
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "llm")
    wide = CLIPConfig(text_config=config.text_config.to_dict(),
                      vision_config={**config.vision_config.to_dict(), "hidden_size": 48}, projection_dim=12)
    CLIPModel(wide).save_pretrained(root / "wide")
    tokenizer.save_pretrained(root / "wide")
    return root


def test_cdpruner_hf_clip_relevance(model, processor, images, clip_dirs):
    from transformers import AutoTokenizer, CLIPModel

    pruner = CDPrunerPruner(budget=4, text_encoder=str(clip_dirs / "hf"), tokenizer=str(clip_dirs / "llm"))
    assert pruner.sign is True  # the official -cos with a CLIP text tower
    one = single(processor, images, 0)
    compress(model, method=pruner)
    with torch.no_grad():
        model(**one)
    kept = model.compression.last.selection.kept_index[0]
    restore(model)
    assert pruner.question(instruction(one, model.config.image_token_id)) == "what color is the square ?"
    # the official pipeline by hand: E = visual_projection(post_layernorm(V)), one 77-token segment of the question
    clip, clip_tok = CLIPModel.from_pretrained(clip_dirs / "hf").eval(), AutoTokenizer.from_pretrained(clip_dirs / "hf")
    encoded = get_adapter(model).encode_images(one["pixel_values"])[0]
    with torch.no_grad():
        image = clip.visual_projection(clip.vision_model.post_layernorm(encoded.vision_features[0]))
        ids = clip_tok("what color is the square ?")["input_ids"]
        padded = torch.tensor([ids + [0] * (77 - len(ids))])
        mask = torch.tensor([[1] * len(ids) + [0] * (77 - len(ids))])
        text = clip.text_projection(clip.text_model(input_ids=padded, attention_mask=mask).pooler_output)
    rel = relevance_from_cosines(unit(image) @ unit(text).T, negate=True)
    assert torch.equal(kept, dpp_select(encoded.features[0], rel, 4).sort().values)
    # long questions: no truncation, one embedding per 77-token segment
    long = " ".join(["what color is the square ?"] * 30)
    assert pruner.text_tower().text_embeds(long, torch.device("cpu")).shape == (math.ceil(len(clip_tok(long)["input_ids"]) / 77), 12)


def test_cdpruner_open_clip_folder(model, processor, images, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 12, "vision_cfg": {"image_size": 56, "layers": 1, "width": LlavaDims().vision_hidden,
                                           "head_width": 16, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(2)
    save_file(open_clip.model.CLIP(**cfg).state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    llm = tmp_path / "llm"
    processor.tokenizer.save_pretrained(llm)
    pruner = CDPrunerPruner(budget=0.25, text_encoder=str(tmp_path), tokenizer=str(llm))
    tower = pruner.text_tower()
    assert tower.vision_width == LlavaDims().vision_hidden
    assert tower.text_embeds(" ".join(["how many"] * 60), torch.device("cpu")).shape == (2, 12)  # 122 tokens
    one = single(processor, images, 1)
    compress(model, method=pruner)
    with torch.no_grad():
        model(**one)
    kept = model.compression.last.selection.kept_index[0]
    restore(model)
    encoded = get_adapter(model).encode_images(one["pixel_values"])[0]
    with torch.no_grad():
        visual = tower.model.visual
        image = visual.ln_post(encoded.vision_features[0]) @ visual.proj
        text = tower.model.encode_text(open_clip.get_tokenizer(f"local-dir:{tmp_path}")(["how many ?"]))
    rel = relevance_from_cosines(unit(image) @ unit(text).T, negate=True)
    assert torch.equal(kept, dpp_select(encoded.features[0], rel, 4).sort().values)


def test_cdpruner_text_encoder_errors(model, clip_dirs, tmp_path):
    with pytest.raises(ValueError, match="is not a directory; pass a local CLIP checkpoint"):
        compress(model, 0.25, "cdpruner", text_encoder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither config.json"):
        compress(model, 0.25, "cdpruner", text_encoder=str(tmp_path))
    with pytest.raises(ValueError, match="vision tower is 48 wide, but this model's vision features are 32 wide"):
        compress(model, 0.25, "cdpruner", text_encoder=str(clip_dirs / "wide"), tokenizer=str(clip_dirs / "llm"))
    with pytest.raises(ValueError, match="pass tokenizer="):  # a model built in memory has no directory
        compress(model, 0.25, "cdpruner", text_encoder=str(clip_dirs / "hf"))
    assert not hasattr(model, "compression") and "forward" not in model.__dict__


# ---- other families: one grid per image or frame -----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_qwen_and_onevision_videos(tokenizer, method):
    qwen, qproc = build_qwen(tokenizer), build_qwen_processor(tokenizer)
    q_inputs = qproc(images=random_images(2, (40, 48)), text=PROMPTS[:2], return_tensors="pt", padding=True)
    dims = LlavaDims(image_size=56, patch_size=7, text_layers=2)
    ov, ovproc = build_onevision(tokenizer, dims), build_onevision_processor(tokenizer, dims)
    clips = [np.random.default_rng(s).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8) for s in range(2)]
    prompts = ["USER: <video>\nwhat color is the square ? ASSISTANT:", "USER: <video>\nhow many ? ASSISTANT:"]
    v_inputs = ovproc(videos=clips, text=prompts, return_tensors="pt", padding=True)
    for m, inputs in ((qwen, q_inputs), (ov, v_inputs)):
        with torch.no_grad():
            ref = m(**inputs).logits
            compress(m, 1.0, method)
            assert torch.equal(m(**inputs).logits, ref)
            restore(m)
            compress(m, 0.3, method)
            out = m.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
            assert m.compression.stats.visual_tokens_kept < m.compression.stats.visual_tokens_in
            restore(m)
