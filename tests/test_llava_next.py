"""LLaVA-NeXT (AnyRes) adapter: layout of thumbnail, crops and newlines; every method through the stock model."""

import pytest
import torch
from conftest import PROMPTS

from vlm_compress import compress, get_method, list_methods, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.budget import tokens_to_keep
from vlm_compress.testing import build_llava_next, build_next_processor, random_images

METHODS = [m for m in list_methods("encoder") if m not in ("mqt", "quota")]  # mqt has no AnyRes variant (test_mqt.py); quota: videos (test_quota.py)
SIZES = [(60, 80), (112, 50), (56, 56)]  # landscape 2×2 crops, portrait 2×1, square 1×2 after pinpoint choice


@pytest.fixture(scope="module")
def next_processor(tokenizer):
    return build_next_processor(tokenizer)


@pytest.fixture()
def next_model(tokenizer):
    return build_llava_next(tokenizer)


@pytest.fixture(scope="module")
def next_images():
    return [random_images(1, size, seed=i)[0] for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def next_batch(next_processor, next_images):
    return next_processor(images=next_images, text=PROMPTS, return_tensors="pt", padding=True)


def encoded(model, batch):
    return get_adapter(model).encode_images(batch["pixel_values"], image_sizes=batch["image_sizes"])


def test_layout_tiles_the_unpadded_grid_with_a_newline_per_row(next_model, next_batch):
    for images in encoded(next_model, next_batch):
        layout = images.layout
        rows, cols = layout.grids[1]
        side = layout.grids[0][0]
        assert layout.tokens_of(0).tolist() == list(range(side * side))  # thumbnail first, raster order
        hires = layout.tokens_of(1)
        assert hires.numel() == rows * cols and layout.num_newlines == rows
        cells = layout.cell[hires]
        assert torch.equal(cells, torch.stack([torch.arange(rows * cols) // cols, torch.arange(rows * cols) % cols], 1))
        newlines = layout.newline.nonzero().squeeze(1)
        assert torch.equal(newlines, side * side + torch.arange(1, rows + 1) * (cols + 1) - 1)  # each row's end
        # crops tile the padded grid: some padding offset puts every token in its crop's side×side block
        crop_rows, crop_cols = layout.crop_layout
        crop = layout.crop[hires]
        assert crop.max() < crop_rows * crop_cols
        for axis, block in ((0, crop // crop_cols), (1, crop % crop_cols)):
            assert any(torch.equal((cells[:, axis] + pad) // side, block) for pad in range(side))
        extents = layout.crop_extents()
        assert sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in extents.values()) == rows * cols  # they tile it


def test_features_and_sources_line_up(next_model, next_batch):
    model = next_model
    tower = model.model.vision_tower
    pixels = torch.cat([p[: n] for p, n in zip(next_batch["pixel_values"], [5, 3, 3])])
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2].flatten(0, 1)  # [crops·T, Dv]
        for images in encoded(model, next_batch):
            newline = images.layout.newline
            src = images.source[0]
            assert (src[newline] == -1).all()
            torch.testing.assert_close(images.vision_features[0][~newline], hidden[src[~newline]])
            projected = model.model.multi_modal_projector(images.vision_features[0][~newline])
            torch.testing.assert_close(images.features[0][~newline], projected)
            assert torch.equal(images.features[0][newline], model.model.image_newline.expand(int(newline.sum()), -1))


def expected(method, budget, images):
    k = tokens_to_keep(budget, images.layout.num_tokens)
    if method in ("pool", "m3"):  # pooled grids may hold fewer (tested on their own in test_methods.py)
        return get_method(method).create(budget=budget).output_count(k, images.layout)
    return k


@pytest.mark.parametrize("method", METHODS)
def test_identity_counts_and_newline_stats(next_model, next_batch, method):
    model = next_model
    batches = encoded(model, next_batch)
    n = [b.layout.num_tokens for b in batches]
    with torch.no_grad():
        ref = model(**next_batch).logits
        compress(model, budget=1.0, method=method)
        assert torch.equal(model(**next_batch).logits, ref)
        stats = model.compression.stats
        assert stats.kept_per_image == n and stats.newlines_kept == stats.newlines_in == sum(b.layout.num_newlines for b in batches)
        restore(model)
        for budget in (0.3, 0.1, 7, 10_000):
            compress(model, budget=budget, method=method)
            model(**next_batch)
            stats = model.compression.stats
            assert stats.kept_per_image == [expected(method, budget, b) for b in batches]
            ids = model.compression.last.input_ids
            assert ((ids == model.config.image_token_id).sum(1) == torch.tensor(stats.kept_per_image)).all()
            restore(model)


@pytest.mark.parametrize("method", METHODS)
def test_next_batch_equals_single(next_model, next_processor, next_images, next_batch, method):
    model = next_model
    assert (next_batch["attention_mask"][:, 0] == 0).any(), "fixture must be left-padded"
    compress(model, budget=0.25, method=method)
    with torch.no_grad():
        batched = model(**next_batch).logits[:, -1]
        for i in range(3):
            one = next_processor(images=[next_images[i]], text=[PROMPTS[i]], return_tensors="pt")
            torch.testing.assert_close(model(**one).logits[:, -1], batched[i : i + 1], atol=1e-5, rtol=1e-4)


def test_next_generate_and_restore(next_model, next_batch):
    model = next_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**next_batch).logits
        compress(model, budget=0.2, method="cls_attn")
        out = model.generate(**next_batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(out[:, : next_batch["input_ids"].shape[1]], next_batch["input_ids"])
        restore(model)
        assert torch.equal(model(**next_batch).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


@pytest.mark.parametrize("method", ["fastv", "mustdrop_llm", "h2o"])
def test_in_llm_methods_on_anyres_prompts(tokenizer, next_processor, next_images, next_batch, method):
    """Identity at full budget and batch = single with AnyRes prompts (newlines are visual tokens in the plan)."""
    from vlm_compress.testing import LlavaDims

    model = build_llava_next(tokenizer, LlavaDims(text_layers=4))
    with torch.no_grad():
        ref = model(**next_batch).logits
        compress(model, budget=1.0, method=method)
        assert torch.equal(model(**next_batch).logits, ref)
        restore(model)
        compress(model, budget=0.75, method=method)
        out = model(**next_batch).logits[:, -1]
        for i, image in enumerate(next_images):
            one = next_processor(images=[image], text=[PROMPTS[i]], return_tensors="pt")
            torch.testing.assert_close(model(**one).logits[0, -1], out[i], rtol=1e-4, atol=1e-4)
