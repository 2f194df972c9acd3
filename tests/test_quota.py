"""QuoTA: exact frame assignment, the bilinear frame resize, decoupling parse and fallback, scoring passes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_compress import compress, restore
from vlm_compress.pruners.quota import (
    QUESTION_TEMPLATE, _answer_ids, assign_counts, bilinear_tokens, parse_entities, resize_shape,
)
from vlm_compress.testing import LlavaDims, build_onevision, build_onevision_processor

from conftest import assert_video_batch_equals_single

DIMS = LlavaDims(image_size=56, patch_size=7)  # 4×4 = 16 pooled tokens per frame
PROMPTS = ["USER: <video>\nwhat color is the square ? ASSISTANT:", "USER: <video>\nhow many circle ? ASSISTANT:"]


@pytest.mark.parametrize("scores", [
    [0.0] * 6, [1.0, 0, 0, 0, 0, 0], [0.5] * 6, [0.9, 0.9, 0.1, 0.1, 0.0, 0.3], [1e-9] * 5 + [1.0],
    list(np.random.default_rng(0).random(16)),
])
@pytest.mark.parametrize("total", [1, 7, 17, 40, 96])
def test_assignment_sums_exactly_to_the_budget(scores, total):
    counts = assign_counts(scores, total, per_frame=16)
    assert sum(counts) == min(total, 16 * len(scores))
    assert all(0 <= c <= 16 for c in counts)


def test_assignment_follows_the_weights():
    assert assign_counts([0.0, 0.0, 0.0, 0.0], 8, 16) == [2, 2, 2, 2]  # all-zero: even
    assert assign_counts([1.0, 0.0, 0.0, 0.0], 8, 16) == [8, 0, 0, 0]  # one-hot
    assert assign_counts([1.0, 0.0, 0.0, 0.0], 20, 16) == [16, 2, 1, 1]  # capped at a frame's tokens, rest spread
    # w = (100 p)^2: p = 0.5 vs 0.25 weighs 4 : 1
    assert assign_counts([0.5, 0.25], 10, 16) == [8, 2]
    assert assign_counts([0.3, 0.3, 0.3], 10, 16) == [4, 3, 3]  # ties: remainder to the earliest


def test_parse_entities():
    assert parse_entities("step 1: yes step 2: [triangle, color] step 3: [triangle]") == ["triangle"]
    assert parse_entities("Step 1 : yes\nStep 3 : [ 'red car' , \"dog\" ]") == ["red car", "dog"]
    assert parse_entities("step 1: no step 2: [] step 3: []") == []  # no objects: the question template
    assert parse_entities("the answer is red") is None  # unparseable: fall back to the raw question
    assert parse_entities("step 1: yes step 3: []") is None


def test_resize_shape_covers_the_count_with_the_grid_aspect():
    for count in range(1, 40):
        rows, cols = resize_shape(count, (6, 6))
        assert count <= rows * cols < count + rows
    assert resize_shape(8, (4, 8)) == (2, 4)


def test_bilinear_tokens_formula():
    x = torch.randn(2, 16, 3)
    same, index, merged = bilinear_tokens(x, (4, 4), 16)
    assert torch.equal(same, x) and torch.equal(index, torch.arange(16)) and torch.equal(merged, torch.arange(16))
    half, index, merged = bilinear_tokens(x, (4, 4), 4)  # 4×4 → 2×2 bilinear = the 2×2 block means
    expected = F.avg_pool2d(x.view(2, 4, 4, 3).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(2, 4, 3)
    torch.testing.assert_close(half, expected)
    assert index.tolist() == [5, 7, 13, 15]  # source cell nearest each output centre (rounding down)
    assert merged.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    five, index, merged = bilinear_tokens(x, (4, 4), 5)  # a 2×3 resize, its middle cell dropped
    full = F.interpolate(x.view(2, 4, 4, 3).permute(0, 3, 1, 2), size=(2, 3), mode="bilinear")
    full = full.permute(0, 2, 3, 1).reshape(2, 6, 3)
    torch.testing.assert_close(five, full[:, [0, 1, 3, 4, 5]])
    assert index.shape == (5,)
    # source column c falls in output column floor((c + 0.5)·3/4) = 0, 1, 1, 2; output cell 2 was the dropped one
    assert merged.view(4, 4).tolist() == [[0, 1, 1, -1], [0, 1, 1, -1], [2, 3, 3, 4], [2, 3, 3, 4]]


def stats_of(model, inputs, budget, **options):
    """``model.compression.stats`` of one forward under ``quota`` with ``options``; the model restored after."""
    compress(model, budget, "quota", **options)
    try:
        with torch.no_grad():
            model(**inputs)
        return model.compression.stats
    finally:
        restore(model)


@pytest.fixture(scope="module")
def ov(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("onevision")
    processor = build_onevision_processor(tokenizer, DIMS)
    processor.save_pretrained(path)  # the tokenizer and the video processor (a separate scorer reads its normalisation)
    return build_onevision(tokenizer, DIMS), processor, str(path)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]


@pytest.fixture(scope="module")
def video_batch(ov, clips):
    return ov[1](videos=clips, text=PROMPTS, return_tensors="pt", padding=True)


def test_identity_at_full_budget(ov, video_batch):
    model, _, path = ov
    with torch.no_grad():
        reference = model(**video_batch).logits
        compress(model, 1.0, "quota", tokenizer=path)
        try:
            out = model(**video_batch).logits
            passes = model.compression.stats.scoring_passes
        finally:
            restore(model)
    assert torch.equal(out, reference)
    assert passes == 0  # nothing to assign: no scoring


def test_scores_fall_back_to_the_question_and_drive_the_counts(ov, clips, video_batch):
    """A random model's decoupling answer does not parse, so frames are scored against the raw question; the
    reported scores are P(yes)/(P(yes)+P(no)) of the uncompressed model per frame, and the counts follow them."""
    model, processor, path = ov
    compress(model, 0.3, "quota", tokenizer=path, decouple_tokens=6, score_batch=3)
    try:
        with torch.no_grad():
            model(**video_batch)
        stats, last = model.compression.stats, model.compression.last
    finally:
        restore(model)
    tokenizer = processor.tokenizer
    yes, no = _answer_ids(tokenizer, "yes"), _answer_ids(tokenizer, "no")
    for v, clip in enumerate(clips):
        question = PROMPTS[v].split("\n")[1].replace(" ASSISTANT:", "")
        text = "USER: <video>\n" + QUESTION_TEMPLATE.format(question=question) + " ASSISTANT:"
        expected = []
        for frame in clip:
            inputs = processor(videos=[frame[None]], text=[text], return_tensors="pt")
            with torch.no_grad():
                logits = model(**inputs).logits[0, -1]
            both = torch.stack([logits[yes].logsumexp(-1), logits[no].logsumexp(-1)])
            expected.append(float(both.softmax(-1)[0]))
        assert stats.frame_scores[v] == pytest.approx(expected, abs=1e-5)
        total = round(0.3 * 65) - 1  # the newline is kept
        assert stats.kept_per_frame[v] == assign_counts(expected, total, 16)
        assert last.video_features[v].shape[0] == total + 1
    assert stats.scoring_passes == 2 * (1 + 2)  # per video: decoupling + ceil(4 / 3) scoring passes
    assert stats.scoring_ms > 0 and stats.scoring_tokens > 0 and stats.scoring_flops > 0


def test_another_model_scores_the_frames_as_images(ov, clips, video_batch, tokenizer, tmp_path):
    """scorer=PATH: each frame, un-normalised back to pixels, goes through the scorer's own processor as an image."""
    from PIL import Image

    from vlm_compress.testing import build_llava, build_processor

    scorer, scorer_processor = build_llava(tokenizer, seed=3), build_processor(tokenizer)
    scorer.save_pretrained(tmp_path)
    scorer_processor.save_pretrained(tmp_path)
    model, _, path = ov
    stats = stats_of(model, video_batch, 0.3, tokenizer=path, scorer=str(tmp_path), decouple=False)
    yes, no = _answer_ids(tokenizer, "yes"), _answer_ids(tokenizer, "no")
    for v, clip in enumerate(clips):
        question = PROMPTS[v].split("\n")[1].replace(" ASSISTANT:", "")
        text = "USER: <image>\n" + QUESTION_TEMPLATE.format(question=question) + " ASSISTANT:"
        inputs = scorer_processor(images=[Image.fromarray(f) for f in clip], text=[text] * len(clip),
                                  return_tensors="pt")
        with torch.no_grad():
            logits = scorer(**inputs).logits[:, -1]
        both = torch.stack([logits[:, yes].logsumexp(-1), logits[:, no].logsumexp(-1)], -1)
        assert stats.frame_scores[v] == pytest.approx(both.softmax(-1)[:, 0].tolist(), abs=1e-4)
    assert stats.scoring_passes == 2


def test_scorer_by_embedded_name(ov, video_batch):
    model, _, path = ov
    stats = stats_of(model, video_batch, 0.3, tokenizer=path, scorer="tiny-llava", decouple=False,
                     entity_template="is there a {entities} ?")
    assert all(len(s) == 4 and all(0 <= x <= 1 for x in s) for s in stats.frame_scores)
    with pytest.raises(ValueError, match="could not load the scorer 'no-such-model'"):
        compress(model, 0.3, "quota", tokenizer=path, scorer="no-such-model")
    assert "compression" not in model.__dict__


def test_without_decoupling_only_scoring_passes(ov, video_batch):
    model, _, path = ov
    assert stats_of(model, video_batch, 0.3, tokenizer=path, decouple=False).scoring_passes == 2  # 4 frames a pass


def test_uniform_assignment_is_the_even_split_without_scoring(ov, video_batch):
    model, _, path = ov
    stats = stats_of(model, video_batch, 0.3, tokenizer=path, assign="uniform")
    assert stats.scoring_passes == 0 and stats.frame_scores is None
    assert stats.kept_per_frame == [[5, 5, 5, 4]] * 2  # 19 frame tokens + the newline = round(0.3 · 65)


@pytest.mark.parametrize("within", ["cls_attn", "pool", "random"])
def test_within_another_method(ov, video_batch, within):
    model, _, path = ov
    compress(model, 0.3, "quota", tokenizer=path, decouple=False, within=within)
    try:
        out = model.generate(**video_batch, max_new_tokens=2, do_sample=False)
        kept = model.compression.stats.kept_per_frame
    finally:
        restore(model)
    assert out.shape[1] == video_batch["input_ids"].shape[1] + 2
    if within != "pool":  # a pooled grid may hold fewer
        assert [sum(k) for k in kept] == [round(0.3 * 65) - 1] * 2


def test_batch_equals_single(ov, clips, video_batch):
    model, processor, path = ov
    compress(model, 0.25, "quota", tokenizer=path, decouple=False)
    try:
        assert_video_batch_equals_single(model, processor, clips, PROMPTS, video_batch)
    finally:
        restore(model)


def test_clear_errors(ov, tokenizer):
    model, _, path = ov
    with pytest.raises(ValueError, match="tokenizer='path/to/dir'"):
        compress(model, 0.2, "quota")  # built from a config: no directory to find the tokenizer in
    assert "compression" not in model.__dict__
    with pytest.raises(ValueError, match="takes no videos"):
        from vlm_compress.testing import build_llava

        compress(build_llava(tokenizer), 0.2, "quota", tokenizer=path)
    with pytest.raises(ValueError, match="single-grid encoder method"):
        compress(model, 0.2, "quota", tokenizer=path, within="fastv")
    with pytest.raises(ValueError, match="must contain {entities}"):
        compress(model, 0.2, "quota", tokenizer=path, entity_template="is it there?")
