"""LLaVA-OneVision: AnyRes-max images and pooled video frames through the encoder stage and the in-LLM engine."""

import copy

import numpy as np
import pytest
import torch

from vlm_compress import compress, list_methods, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.adapters.base import find_encoder_layers
from vlm_compress.pruners.random import RandomPruner
from vlm_compress.testing import LlavaDims, build_onevision, build_onevision_processor, random_images

from conftest import assert_video_batch_equals_single

DIMS = LlavaDims(image_size=56, patch_size=7, text_layers=3)  # 8×8 tower grid → 4×4 = 16 tokens per frame
VIDEO_PROMPTS = ["USER: <video>\nwhat color is the square ? ASSISTANT:", "USER: <video>\nhow many ? ASSISTANT:"]
ENCODER_METHODS = [m for m in list_methods("encoder") if m not in ("mqt", "quota")]  # quota: test_quota.py


def videos(count=2, frames=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8) for _ in range(count)]


@pytest.fixture(scope="module", params=["siglip", "clip"])
def tower(request):
    return request.param


@pytest.fixture(scope="module")
def ov(tokenizer, tower):
    return build_onevision(tokenizer, DIMS, tower=tower), build_onevision_processor(tokenizer, DIMS, tower=tower)


@pytest.fixture(scope="module")
def video_batch(ov):
    return ov[1](videos=videos(), text=VIDEO_PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def image_batch(ov):
    texts = ["USER: <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:"]
    return ov[1](images=random_images(2, (60, 120)), text=texts, return_tensors="pt", padding=True)


def test_tower_found_by_structure(ov, tower):
    model = ov[0]
    adapter = get_adapter(model)
    assert adapter.tower_has_cls == (tower == "clip")
    layers = find_encoder_layers(model.model.vision_tower)
    assert len(layers) == DIMS.vision_layers
    assert adapter.vision_attention(-1) is layers[-1].self_attn


@pytest.mark.parametrize("method", ENCODER_METHODS)
@pytest.mark.parametrize("kind", ["video", "image"])
def test_identity_at_full_budget(ov, video_batch, image_batch, method, kind):
    model, _ = ov
    inputs = video_batch if kind == "video" else image_batch
    with torch.no_grad():
        reference = model(**inputs).logits
        compress(model, 1.0, method)
        try:
            out = model(**inputs).logits
        finally:
            restore(model)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("method", ["cls_attn", "random", "visionzip", "hired"])
def test_video_budget_split_evenly_over_frames(ov, video_batch, method):
    model, _ = ov
    per_video = 4 * 16 + 1
    compress(model, 0.25, method)
    try:
        with torch.no_grad():
            model(**video_batch)
        stats = model.compression.stats
    finally:
        restore(model)
    total = round(0.25 * per_video)  # 16: the newline and 15 frame tokens
    assert stats.kept_per_image == [total, total]
    assert stats.kept_per_frame == [[4, 4, 4, 3], [4, 4, 4, 3]]
    assert stats.newlines_in == stats.newlines_kept == 2


def test_video_batch_equals_single(ov, video_batch):
    model, processor = ov
    compress(model, 0.3, "cls_attn")
    try:
        assert_video_batch_equals_single(model, processor, videos(), VIDEO_PROMPTS, video_batch, steps=3)
    finally:
        restore(model)


def test_restore_is_exact_and_patches_gone(ov, video_batch):
    model, _ = ov
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(**video_batch).logits
        compress(model, 0.2, "visionzip")
        model.generate(**video_batch, max_new_tokens=2)
        restore(model)
        after = model(**video_batch).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


def test_compressed_video_features_are_the_kept_tokens(ov, video_batch):
    """What reaches the LLM is exactly the stock pooled tokens at the kept indices, frames in order, newline last."""
    model, _ = ov
    with torch.no_grad():
        stock = model.model.get_video_features(video_batch["pixel_values_videos"]).pooler_output  # [B, 4·16+1, D]
        compress(model, 0.25, "cls_attn")
        try:
            model(**video_batch)
            last = model.compression.last
        finally:
            restore(model)
    for v, (features, index) in enumerate(zip(last.video_features, last.selection.kept_index)):
        assert index[-1] == 4 * 16 and bool((index[:-1].diff() > 0).all())
        assert torch.equal(features, stock[v, index])


class FirstFrameOnly(RandomPruner):
    """A test method that gives a video's whole budget to its first frame."""

    def frame_counts(self, ctx):
        counts = [0] * ctx.num_frames
        counts[0] = min(ctx.total, ctx.tokens_per_frame)
        rest = ctx.total - counts[0]
        counts[1] = rest
        return counts


def test_frame_given_zero_tokens_leaves_no_placeholder(ov, video_batch):
    model, _ = ov
    video_id = model.config.video_token_id
    compress(model, method=FirstFrameOnly(budget=20))
    try:
        with torch.no_grad():
            model(**video_batch)
        last, stats = model.compression.last, model.compression.stats
        out = model.generate(**video_batch, max_new_tokens=2, do_sample=False)
    finally:
        restore(model)
    assert stats.kept_per_frame == [[16, 3, 0, 0], [16, 3, 0, 0]]
    assert (last.input_ids == video_id).sum(dim=1).tolist() == [20, 20]
    assert all(bool((index[:-1] < 2 * 16).all()) for index in last.selection.kept_index)  # frames 2, 3 gone
    assert out.shape[1] == video_batch["input_ids"].shape[1] + 2


def test_in_llm_engine_on_video_prompts(ov, video_batch):
    model, _ = ov
    with torch.no_grad():
        reference = model(**video_batch).logits
        compress(model, 1.0, "fastv", layer=1)
        same = model(**video_batch).logits
        restore(model)
        compress(model, 0.5, "fastv", layer=1)
        model(**video_batch)
        stats = model.compression.stats
        out = model.generate(**video_batch, max_new_tokens=2, do_sample=False)
        restore(model)
    torch.testing.assert_close(same, reference)
    visual = (video_batch["input_ids"] == model.config.video_token_id).sum(dim=1)
    assert stats.layer_visual_tokens[0] == pytest.approx(float(visual[0]))
    assert stats.layer_avg_visual_tokens == pytest.approx(0.5 * float(visual[0]), abs=1.0)
    assert out.shape[0] == 2


def test_encoder_and_in_llm_stacked_on_video(ov, video_batch):
    model, _ = ov
    from vlm_compress.pruners.cls_attn import ClsAttnPruner
    from vlm_compress.pruners.fastv import FastVPruner

    compress(model, method=[ClsAttnPruner(budget=0.5), FastVPruner(budget=0.75, layer=1)])
    try:
        out = model.generate(**video_batch, max_new_tokens=2, do_sample=False)
    finally:
        restore(model)
    assert out.shape[1] == video_batch["input_ids"].shape[1] + 2


def test_multi_image_prompt(ov):
    """Several images in one prompt: each is its base grid plus one newline (no crops)."""
    model, processor = ov
    inputs = processor(images=[random_images(2, (60, 120))], text=["USER: <image> <image>\nhow many ? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
        compress(model, 1.0, "cls_attn")
        same = model(**inputs).logits
        restore(model)
        compress(model, 0.5, "cls_attn")
        model(**inputs)
        stats = model.compression.stats
        restore(model)
    assert torch.equal(same, reference)
    assert stats.kept_per_image == [33, 33]  # 64 base tokens + 1 newline; halves round up


def test_substitute_score_without_cls_is_mean_received_attention(tokenizer):
    """SigLIP has no CLS: cls_attention is the column mean of the eager attention map (heads averaged)."""
    from vlm_compress.scoring import AttentionCapture

    model = build_onevision(tokenizer, DIMS, tower="siglip")
    tower = model.model.vision_tower
    adapter = get_adapter(model)
    pixels = torch.randn(2, 3, 56, 56)
    with AttentionCapture({-1: adapter.vision_attention(-1)}, has_cls=False) as capture:
        tower(pixels)
    tower.set_attn_implementation("eager")
    eager = tower(pixels, output_attentions=True).attentions[-1]  # [I, H, T, T]
    expected = eager.mean(dim=2).mean(dim=1)
    torch.testing.assert_close(capture.first_row_attention(-1), expected, rtol=1e-5, atol=1e-6)


def test_video_needs_its_pixels(ov, video_batch):
    model, _ = ov
    compress(model, 0.5, "cls_attn")
    try:
        inputs = dict(video_batch)
        inputs["pixel_values"] = torch.zeros(1, 3, 3, 56, 56)
        inputs["image_sizes"] = torch.tensor([[56, 56]])
        with pytest.raises(ValueError, match="image placeholder tokens but 1 image"):
            model(**inputs)
    finally:
        restore(model)


def test_anyres_max_shrunk_grid_maps_to_the_nearest_tower_tokens(tokenizer):
    """anyres_max_1: the 16×16 high-resolution grid of 2×2 crops is shrunk bilinearly to 8×8; every packed token maps
    to the tower token nearest its interpolated position (every other row and column of its crop)."""
    model, processor = build_onevision(tokenizer, DIMS), build_onevision_processor(tokenizer, DIMS)
    model.config.vision_aspect_ratio = processor.vision_aspect_ratio = "anyres_max_1"
    inputs = processor(images=random_images(1, (112, 112)), text=["USER: <image>\nwhat ? ASSISTANT:"],
                       return_tensors="pt")
    batch = get_adapter(model).encode_images(inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                             batch_num_images=inputs["batch_num_images"])[0]
    layout = batch.layout
    assert layout.grids == {0: (8, 8), 1: (8, 8)} and layout.num_newlines == 8 and layout.crop_layout == (2, 2)
    first_row = batch.source[0, 64:73].tolist()  # tower images: 0 the base grid, 1–4 the crops (64 tokens each)
    assert first_row == [64, 66, 68, 70, 128, 130, 132, 134, -1]  # crop 0's row 0, crop 1's row 0, newline
    with torch.no_grad():
        reference = model(**inputs).logits
        compress(model, 1.0, "hired")
        same = model(**inputs).logits
        restore(model)
    assert torch.equal(same, reference)


def test_mustdrop_key_set_survives_in_llm_stage_on_video(tokenizer):
    """MustDrop's stage-1 key set, held per frame, is found at the video's placeholders and never dropped later."""
    from vlm_compress.pruners.mustdrop import MustDropPruner
    from vlm_compress.pruners.mustdrop_llm import MustDropLLMPruner

    dims = LlavaDims(image_size=56, patch_size=7, text_layers=4)
    model, processor = build_onevision(tokenizer, dims), build_onevision_processor(tokenizer, dims)
    inputs = processor(videos=videos(), text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    compress(model, method=[MustDropPruner(budget=0.7), MustDropLLMPruner(budget=0.7)])
    try:
        with torch.no_grad():
            model(**inputs)
        state = model.compression
        protected = state.last.selection.protected
        ctx = state.prefill.ctx
        video = state.last.input_ids == model.config.video_token_id
        assert ctx.protected.sum(dim=1).tolist() == [len(p) for p in protected]
        assert bool((ctx.protected <= video).all()) and bool(ctx.alive[ctx.protected].all())
        assert state.stats.layer_visual_tokens[-1] < state.stats.layer_visual_tokens[0]
    finally:
        restore(model)
