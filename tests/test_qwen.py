"""Qwen2-VL and Qwen2.5-VL: native-resolution grids after the 2×2 merger, packed towers without CLS, 3-D M-RoPE."""

import numpy as np
import pytest
import torch

from vlm_compress import compat, compress, list_methods, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.modules.pmod import TokenRouters
from vlm_compress.patching import patched_modules
from vlm_compress.pruners.atp import ATPPruner
from vlm_compress.pruners.pmod import PModPruner
from vlm_compress.registry import get_method
from vlm_compress.scoring import PackedAttentionCapture
from vlm_compress.testing import QWEN_KINDS, QwenDims, build_qwen, build_qwen_processor, random_images

DIMS = QwenDims(text_layers=4)
PROMPTS = ["USER: <image>\nwhat color is the square ? ASSISTANT:",
           "USER: <image> and <image>\nhow many ? ASSISTANT:"]
VIDEO_PROMPTS = ["USER: <video>\nwhat color is the square ? ASSISTANT:", "USER: <video>\nhow many ? ASSISTANT:"]
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


@pytest.fixture(scope="module", params=QWEN_KINDS)
def qwen(request, tokenizer):
    return build_qwen(tokenizer, DIMS, kind=request.param, attention_gain=8.0)


@pytest.fixture(scope="module")
def qproc(tokenizer):
    return build_qwen_processor(tokenizer)


@pytest.fixture(scope="module")
def qimages():
    """Three images of two resolutions: 10×12 and 6×14 patches (5×6 and 3×7 visual tokens)."""
    return random_images(2, (40, 48)) + random_images(1, (24, 56), seed=1)


@pytest.fixture(scope="module")
def image_inputs(qproc, qimages):
    """A one-image and a two-image prompt of different lengths, left-padded."""
    return qproc(images=qimages, text=PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (4, 32, 40, 3), dtype=np.uint8), rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def video_inputs(qproc, clips):
    return qproc(videos=clips, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)


def compressed_forward(model, inputs, budget, method):
    """One forward of ``model`` compressed with ``method``; the compression state it left (``last``, ``stats``)."""
    compress(model, budget, method)
    try:
        model(**inputs)
        return model.compression
    finally:
        restore(model)


def routers(tmp_path, hidden):
    r = TokenRouters(hidden, list(range(DIMS.text_layers)))
    generator = torch.Generator().manual_seed(0)
    for router in r.routers.values():
        router.weight.data = torch.randn(router.weight.shape, generator=generator)
    r.save(tmp_path / "routers")
    return str(tmp_path / "routers")


def method_args(name, budget, tmp_path):
    """compress() keywords for ``name`` on the tiny random Qwen (in-LLM methods without trained modules)."""
    if name == "atp":
        return dict(method=ATPPruner(budget=budget, heads=None))
    if name == "pmod":
        return dict(method=PModPruner(budget=budget, routers=routers(tmp_path, DIMS.text_hidden)))
    if name == "fastv":  # K=1: low budgets are reachable on the 4-layer LLM
        return dict(budget=budget, method=name, layer=1)
    return dict(budget=budget, method=name)


def uncompressed_positions(model, inputs):
    """[3, B, L] the stock M-RoPE positions (``get_rope_index``) of the uncompressed prompt."""
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              attention_mask=inputs["attention_mask"], **grids)
    return positions


ENCODER = ["cls_attn", "random", "pool", "visionzip", "fopru", "mustdrop", "hired", "globalcom2"]
IN_LLM = ["fastv", "mustdrop_llm", "atp", "pmod", "h2o"]


@pytest.mark.parametrize("method", ENCODER + IN_LLM)
def test_identity_at_full_budget_images(qwen, image_inputs, method, tmp_path):
    ref = qwen(**image_inputs).logits
    tokens = qwen.generate(**image_inputs, **GREEDY)
    compress(qwen, **method_args(method, 1.0, tmp_path))
    try:
        torch.testing.assert_close(qwen(**image_inputs).logits, ref, rtol=0, atol=0)
        assert torch.equal(qwen.generate(**image_inputs, **GREEDY), tokens)
    finally:
        restore(qwen)


@pytest.mark.parametrize("method", ["cls_attn", "visionzip", "fastv"])
def test_identity_at_full_budget_video(qwen, video_inputs, method, tmp_path):
    tokens = qwen.generate(**video_inputs, **GREEDY)
    compress(qwen, **method_args(method, 1.0, tmp_path))
    try:
        assert torch.equal(qwen.generate(**video_inputs, **GREEDY), tokens)
    finally:
        restore(qwen)


@pytest.mark.parametrize("method", sorted(set(list_methods()) - {"mqt", "quota"}))
def test_generate_runs_for_every_method(qwen, image_inputs, video_inputs, method, tmp_path):
    compress(qwen, **method_args(method, 0.6, tmp_path))
    try:
        for inputs in (image_inputs, video_inputs):
            out = qwen.generate(**inputs, **GREEDY)
            assert out.shape == (2, inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"])
            assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
            stats = qwen.compression.stats
            if get_method(method).stage == "decode":  # the prompt enters whole; its KV cache is evicted
                assert stats.kv_cache_bytes < stats.kv_cache_bytes_full
            else:
                assert 0 < stats.layer_avg_visual_tokens < stats.visual_tokens_in / stats.images
    finally:
        restore(qwen)


def test_llava_trained_query_transformer_is_refused_with_the_reason(qwen):
    """mqt's resampler reads the vision-space features: on Qwen the merger's input, 4 patches wide."""
    width = 4 * (getattr(qwen.config.vision_config, "embed_dim", None) or qwen.config.vision_config.hidden_size)
    assert get_adapter(qwen).vision_feature_size == width
    with pytest.raises(ValueError, match=rf"needs {width} → {DIMS.text_hidden}: pass resampler=PATH"):
        compress(qwen, 0.5, "mqt")
    assert not patched_modules(qwen)


def test_counts_match_the_budget_per_image_and_frame(qwen, image_inputs, video_inputs):
    compress(qwen, 0.3, "cls_attn")
    try:
        qwen(**image_inputs)
        per_image = [int(t * h * w) // 4 for t, h, w in image_inputs["image_grid_thw"].tolist()]
        assert qwen.compression.stats.kept_per_image == [int(np.floor(0.3 * n + 0.5)) for n in per_image]
        qwen(**video_inputs)
        stats = qwen.compression.stats
        for (t, h, w), kept in zip(video_inputs["video_grid_thw"].tolist(), stats.kept_per_frame):
            assert len(kept) == t and sum(kept) == int(np.floor(0.3 * t * h * w / 4 + 0.5))
    finally:
        restore(qwen)


def with_video_timing(model, inputs):
    """Qwen2.5-VL videos: its processor's ``second_per_grid_ts`` (seconds per temporal slice) spaces the temporal
    positions; two clips at different frame rates."""
    if type(model).__name__.startswith("Qwen2_5") and "video_grid_thw" in inputs:
        return {**inputs, "second_per_grid_ts": torch.tensor([1.0, 0.5])}
    return inputs


def test_positions_matter_in_the_tiny_models(qwen, image_inputs):
    """The identity and position tests mean something: moving the visual tokens' M-RoPE rows changes the logits."""
    full = uncompressed_positions(qwen, image_inputs)
    text = (image_inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)[None]
    with torch.no_grad():
        ref = qwen(**image_inputs, position_ids=torch.cat([text, full])).logits
        shifted = full.clone()
        shifted[1] += 3 * (image_inputs["input_ids"] == qwen.config.image_token_id)  # visual tokens' height row
        moved = qwen(**image_inputs, position_ids=torch.cat([text, shifted])).logits
    assert (ref - moved).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["image", "video"])
def test_kept_tokens_keep_their_uncompressed_positions(qwen, image_inputs, video_inputs, kind):
    inputs = image_inputs if kind == "image" else with_video_timing(qwen, video_inputs)
    token = qwen.config.image_token_id if kind == "image" else qwen.config.video_token_id
    full = uncompressed_positions(qwen, inputs)
    last = compressed_forward(qwen, inputs, 0.3, "cls_attn").last
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    placeholders = (ids == token).flatten().nonzero().squeeze(1)
    counts = [int(t * h * w) // 4 for t, h, w in inputs[f"{kind}_grid_thw"].tolist()]
    expected_columns = torch.arange(ids.numel())  # uncompressed column whose position each kept column must have
    for place, kept in zip(placeholders.split(counts), last.selection.kept_index):
        expected_columns[place[: kept.numel()]] = place[kept]
    expected_columns = (expected_columns % ids.shape[1]).view_as(ids)
    new_mask = last.attention_mask.bool()
    for b in range(ids.shape[0]):
        kept_columns = expected_columns[b][last.keep_mask[b] & mask[b]]
        want = full[:, b, kept_columns]  # [3, L']
        got = last.position_ids[1:, b][:, new_mask[b]]
        assert torch.equal(got, want)
        after = (ids[b] == token).nonzero().max() + 1  # the first text token after the last visual token
        new_after = int((last.input_ids[b] == token).nonzero().max()) + 1
        assert torch.equal(last.position_ids[1:, b, new_after], full[:, b, after])
        assert torch.equal(last.position_ids[0, b][new_mask[b]], torch.arange(int(new_mask[b].sum())))


def _language_model_positions(model, inputs, compressed_with=None, tmp_path=None):
    """The M-RoPE rows the LLM receives at the prompt's last token and at the first two decode steps."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"])

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if compressed_with is not None:
            compress(model, **method_args(compressed_with, 0.3, tmp_path))
        model.generate(**inputs, **GREEDY)
    finally:
        handle.remove()
        if compressed_with is not None:
            restore(model)
    rows = lambda p: p[-3:]  # noqa: E731  (4-row ids: text row first)
    return [rows(seen[0])[..., -1]] + [rows(p)[..., -1] for p in seen[1:3]]


@pytest.mark.parametrize("method", ["cls_attn", "fastv", "hired"])
@pytest.mark.parametrize("kind", ["image", "video"])
def test_decode_steps_continue_at_the_uncompressed_positions(qwen, image_inputs, video_inputs, method, kind, tmp_path):
    """The prompt's last token and every decode step sit where they would without compression, in all three
    M-RoPE rows (encoder-stage: through the rewritten 4-row ids; in-LLM: through the layers' gathered tables)."""
    inputs = image_inputs if kind == "image" else with_video_timing(qwen, video_inputs)
    want = _language_model_positions(qwen, inputs)
    got = _language_model_positions(qwen, inputs, method, tmp_path)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_cached_steps_without_position_ids_use_the_rope_deltas(qwen, qproc, qimages):
    """A hand-written decode loop (no position ids, no mask: one unpadded prompt, as the stock model supports it)
    continues at the uncompressed positions: rope_deltas are set for the shortened prompt."""
    inputs = qproc(images=qimages[1:], text=[PROMPTS[1]], return_tensors="pt")
    compress(qwen, 0.3, "cls_attn")
    try:
        out = qwen.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
        first = qwen(**inputs, use_cache=True)
        step = out.sequences[:, inputs["input_ids"].shape[1]][:, None]
        second = qwen(input_ids=step, use_cache=True, **{compat.CACHE_ARGUMENT: compat.cache_of_output(first)})
        torch.testing.assert_close(second.logits[:, -1], out.logits[1], rtol=1e-4, atol=1e-4)
    finally:
        restore(qwen)


@pytest.mark.parametrize("method", ["cls_attn", "visionzip", "fastv"])
def test_batch_equals_single(qwen, qproc, qimages, image_inputs, method, tmp_path):
    compress(qwen, **method_args(method, 0.4, tmp_path))
    try:
        greedy = dict(GREEDY, return_dict_in_generate=True, output_logits=True)
        out = qwen.generate(**image_inputs, **greedy)
        width = image_inputs["input_ids"].shape[1]
        for i, (prompt, images) in enumerate(zip(PROMPTS, ([qimages[0]], qimages[1:]))):
            one = qwen.generate(**qproc(images=images, text=[prompt], return_tensors="pt"), **greedy)
            assert torch.equal(out.sequences[i, width:], one.sequences[0, -GREEDY["max_new_tokens"]:])
            torch.testing.assert_close(out.logits[0][i], one.logits[0][0], rtol=1e-4, atol=1e-4)
    finally:
        restore(qwen)


def test_image_and_video_in_one_prompt(qwen, qproc, qimages, clips):
    """Mixed media: an image and a video in one prompt, a two-image prompt beside it; counts per medium and the
    positions of the text after both match the uncompressed prompt."""
    inputs = qproc(images=qimages, videos=clips[:1], return_tensors="pt", padding=True,
                   text=["USER: <image> then <video>\nhow many ? ASSISTANT:", "USER: <image> and <image>\nhow many ? ASSISTANT:"])
    want = _language_model_positions(qwen, inputs)
    tokens = qwen.generate(**inputs, **GREEDY)
    compress(qwen, 1.0, "cls_attn")
    try:
        assert torch.equal(qwen.generate(**inputs, **GREEDY), tokens)
    finally:
        restore(qwen)
    got = _language_model_positions(qwen, inputs, "cls_attn")
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    stats = compressed_forward(qwen, inputs, 0.3, "cls_attn").stats
    t, h, w = inputs["video_grid_thw"][0].tolist()
    images = [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]
    assert stats.kept_per_image == [int(np.floor(0.3 * n + 0.5)) for n in images + [t * h * w // 4]]


def test_restore_is_exact(qwen, image_inputs, video_inputs):
    state = {k: v.clone() for k, v in qwen.state_dict().items()}
    ref = qwen(**image_inputs).logits
    compress(qwen, 0.6, ["visionzip", "fastv"])
    qwen(**image_inputs)
    qwen.generate(**video_inputs, **GREEDY)
    restore(qwen)
    assert not patched_modules(qwen) and "compression" not in qwen.__dict__
    assert all(torch.equal(v, state[k]) for k, v in qwen.state_dict().items())
    assert torch.equal(qwen(**image_inputs).logits, ref)


def test_merger_groups_map_to_their_tokens(qwen, image_inputs, video_inputs):
    """The vision-space features of every visual token, projected by the merger, are the stock features: the 2×2
    groups (Qwen2.5-VL: window-permuted) are mapped back to the right tokens."""
    adapter = get_adapter(qwen)
    with torch.no_grad():
        stock = qwen.model.get_image_features(image_inputs["pixel_values"], image_inputs["image_grid_thw"],
                                              return_dict=True).pooler_output
        batches = adapter.encode_images(image_inputs["pixel_values"], image_grid_thw=image_inputs["image_grid_thw"])
        for batch, want in zip(batches, stock):
            torch.testing.assert_close(batch.project(batch.vision_features)[0], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch.features[0], want)
        videos = adapter.encode_videos(video_inputs["pixel_values_videos"], video_grid_thw=video_inputs["video_grid_thw"])
        for video in videos:
            frames = video.frames
            torch.testing.assert_close(frames.project(frames.vision_features), frames.features, rtol=1e-5, atol=1e-5)


def _brute_force_received(tower, attention, pixel_values, grid_thw):
    """Per patch, the head-mean attention it receives from every query of its own image (full softmax), in the order
    the blocks see patches, from the block input computed independently of the capture."""
    kept = {}
    handle = attention.register_forward_pre_hook(
        lambda m, args, kwargs: kept.update(x=args[0] if args else kwargs["hidden_states"],
                                            tables=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        tower(pixel_values, grid_thw=grid_thw)
    handle.remove()
    x, (cos, sin) = kept["x"], kept["tables"]
    q, k, _ = attention.qkv(x).view(x.shape[0], 3, attention.num_heads, -1).unbind(1)
    half = q.shape[-1] // 2
    rot = lambda t: torch.cat([-t[..., half:], t[..., :half]], -1)  # noqa: E731
    q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
    out, start = torch.zeros(x.shape[0]), 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            n = h * w
            a = torch.einsum("qhd,khd->hqk", q[start:start + n], k[start:start + n]) * attention.scaling
            out[start:start + n] = a.softmax(-1).mean(dim=(0, 1))
            start += n
    return out


def test_packed_capture_score_is_mean_received_attention_per_image(qwen, image_inputs):
    """The CLS substitute on a packed tower: each patch's attention received, averaged over the queries of its own
    image (never across images), computed in query blocks smaller than an image."""
    adapter = get_adapter(qwen)
    layer = -1
    attention = adapter.vision_attention(layer)
    capture = PackedAttentionCapture({layer: attention}, adapter.vision_tower, block=7)
    with capture, torch.no_grad():
        adapter.vision_tower(image_inputs["pixel_values"], grid_thw=image_inputs["image_grid_thw"])
    got = capture.first_row_attention(layer, "mean", "probs")[0]
    want = _brute_force_received(adapter.vision_tower, attention, image_inputs["pixel_values"],
                                 image_inputs["image_grid_thw"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for start, end in capture.segments:  # each image's scores sum to one (mean over its queries of softmax rows)
        torch.testing.assert_close(got[start:end].sum(), torch.tensor(1.0))


def test_visual_token_score_is_the_mean_over_its_merged_patches(qwen, image_inputs):
    """cls_attn on Qwen keeps the tokens whose four patches receive the most attention on average."""
    adapter = get_adapter(qwen)
    attention = adapter.vision_attention(-2)
    grid = image_inputs["image_grid_thw"]
    capture = PackedAttentionCapture({-2: attention}, adapter.vision_tower)
    with capture, torch.no_grad():
        adapter.vision_tower(image_inputs["pixel_values"], grid_thw=grid)
    patch_scores = capture.first_row_attention(-2)[0]
    kept = compressed_forward(qwen, image_inputs, 0.25, "cls_attn").last.selection.kept_index  # layer -2
    order = compat.merge_group_positions(adapter.vision_tower, grid)
    offset = 0
    for (t, h, w), index in zip(grid.tolist(), kept):
        n = t * h * w // 4
        groups = order[offset: offset + n]
        token_scores = patch_scores.view(-1, 4).mean(1)[groups]
        want = token_scores.topk(index.numel()).indices.sort().values
        assert torch.equal(index.cpu(), want)
        offset += n


def test_quota_scores_video_frames_on_qwen(qwen, video_inputs, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    compress(qwen, 0.3, "quota", tokenizer=str(tmp_path), decouple=False)
    try:
        out = qwen.generate(**video_inputs, **GREEDY)
        stats = qwen.compression.stats
    finally:
        restore(qwen)
    assert out.shape[0] == 2
    frames = [int(t) for t in video_inputs["video_grid_thw"][:, 0]]
    assert [len(s) for s in stats.frame_scores] == frames and stats.scoring_passes >= 2
    assert all(0 <= p <= 1 for s in stats.frame_scores for p in s)


def test_qwen3_vl_is_refused_with_the_reason(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    model = Qwen3VLForConditionalGeneration(config)
    with pytest.raises(TypeError, match="DeepStack"):
        compress(model, 0.5, "cls_attn")
    assert not patched_modules(model)


def test_missing_grid_gets_a_clear_error(qwen, image_inputs):
    inputs = {k: v for k, v in image_inputs.items() if k != "image_grid_thw"}
    compress(qwen, 0.5, "cls_attn")
    try:
        with pytest.raises(ValueError, match="image_grid_thw"):
            qwen(**inputs)
    finally:
        restore(qwen)
