"""``budget="auto"``: per-image counts chosen from a method's own token scores (vlm_compress.budget.auto_count)."""

import numpy as np
import pytest
import torch

from vlm_compress import compress, get_method, list_methods, restore
from vlm_compress.budget import auto_count, validate_budget
from vlm_compress.bench.data import ASSETS, shapes_items
from vlm_compress.bench.run import load_model
from vlm_compress.config import MethodConfig
from vlm_compress.testing import (LlavaDims, build_llava_next, build_next_processor, build_onevision,
                                  build_onevision_processor, random_images)

AUTO_METHODS = ["cls_attn", "fopru", "globalcom2", "hired", "mustdrop", "visionzip"]


def test_auto_count_is_the_fewest_tokens_reaching_the_mass():
    scores = torch.tensor([0.1, 0.5, float("-inf"), 0.3, 0.1])
    assert auto_count(scores, 0.8) == 2  # 0.5 + 0.3 of 1.0
    assert auto_count(scores, 0.81) == 3
    assert auto_count(scores, 0.5) == 1
    assert auto_count(scores, 1.0) == 4  # every finite score; the -inf one (a newline) never counts
    assert auto_count(torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2]), 0.5) == 3  # 0.6 is the first share >= 0.5
    assert auto_count(torch.zeros(4), 0.9) == 4  # no signal: everything the method could pick
    assert auto_count(torch.full((3,), float("-inf")), 0.9) == 1


def test_negative_scores_become_shares_by_softmax():
    logits = torch.tensor([2.0, -1.0, 0.0, -3.0])
    shares = logits.softmax(0)  # [0.84, 0.04, 0.11, 0.006]
    assert auto_count(logits, 0.8) == 1 and auto_count(logits, float(shares[0]) + 0.01) == 2


def test_budget_strings():
    assert validate_budget("auto") == "auto:0.9" and validate_budget("auto:0.75") == "auto:0.75"
    for bad in ("auto:0", "auto:1.5", "auto:x"):
        with pytest.raises(ValueError, match=r"'auto' or 'auto:<mass>'"):
            validate_budget(bad)
    for bad in ("half", "0.5"):
        with pytest.raises(TypeError, match=r"an int >= 1 \(visual tokens kept per image\) or 'auto', got str"):
            validate_budget(bad)
    config = get_method("cls_attn").create(budget="auto:0.8")
    assert MethodConfig.from_json(config.to_json()) == config


def test_auto_methods_are_the_score_based_encoder_methods():
    assert [m for m in list_methods("encoder") if get_method(m).supports_auto()] == AUTO_METHODS


@pytest.mark.parametrize("method", ["random", "pool", "fastv"])
def test_auto_refused_without_scores(model, method):
    with pytest.raises(ValueError, match=rf"{method!r} ranks no tokens by score. Use one of cls_attn, fopru"):
        compress(model, "auto", method)
    assert "compression" not in model.__dict__


@pytest.fixture(scope="module")
def tiny_llava():
    return load_model(ASSETS / "tiny-llava", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def shapes():
    items = shapes_items(4)
    return [it.image for it in items], [f"USER: <image>\n{it.question} ASSISTANT:" for it in items]


@pytest.mark.parametrize("method", ["cls_attn", "hired", "visionzip", "fopru", "mustdrop"])
def test_counts_differ_per_image_and_equal_single_calls(tiny_llava, shapes, method):
    model, processor = tiny_llava
    images, prompts = shapes
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    compress(model, "auto", method)
    try:
        out = model(**batch)
        counts = model.compression.stats.kept_per_image
        placeholders = (model.compression.last.input_ids == model.config.image_token_id).sum(dim=1)
        singles, logits = [], []
        for image, prompt in zip(images, prompts):
            single = model(**processor(images=[image], text=[prompt], return_tensors="pt"))
            singles += model.compression.stats.kept_per_image
            logits.append(single.logits[0, -1])
    finally:
        restore(model)
    assert counts == singles and len(set(counts)) > 1 and max(counts) < 144
    assert placeholders.tolist() == counts
    assert torch.allclose(out.logits[:, -1], torch.stack(logits), atol=1e-4)


@pytest.mark.parametrize("method", ["cls_attn", "hired"])
def test_auto_selects_what_the_chosen_count_selects(tiny_llava, shapes, method):
    """An image under "auto" keeps exactly the tokens the method keeps with its chosen count as an int budget."""
    model, processor = tiny_llava
    images, prompts = shapes
    for image, prompt in zip(images[:2], prompts[:2]):
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        compress(model, "auto:0.6", method)
        model(**inputs)
        (count,), auto_kept = model.compression.stats.kept_per_image, model.compression.last.selection.kept_index[0]
        restore(model)
        compress(model, count, method)
        model(**inputs)
        fixed_kept = model.compression.last.selection.kept_index[0]
        restore(model)
        assert torch.equal(auto_kept, fixed_kept)


def test_smaller_mass_keeps_fewer(tiny_llava, shapes):
    model, processor = tiny_llava
    batch = processor(images=shapes[0], text=shapes[1], return_tensors="pt", padding=True)
    counts = []
    for mass in (0.3, 0.6, 0.9):
        compress(model, f"auto:{mass}", "cls_attn")
        model(**batch)
        counts.append(model.compression.stats.kept_per_image)
        restore(model)
    assert all(a <= b for low, high in zip(counts, counts[1:]) for a, b in zip(low, high))
    assert counts[0] != counts[2]


def test_full_mass_is_identity(tiny_llava, shapes):
    model, processor = tiny_llava
    batch = processor(images=shapes[0], text=shapes[1], return_tensors="pt", padding=True)
    reference = model(**batch).logits
    compress(model, "auto:1.0", "cls_attn")
    try:
        assert torch.equal(model(**batch).logits, reference)  # attention probabilities are all > 0
        assert model.compression.stats.kept_per_image == [144] * 4
    finally:
        restore(model)


def test_auto_on_video_frames(tokenizer):
    dims = LlavaDims(image_size=56, patch_size=7, text_layers=3)
    model, processor = build_onevision(tokenizer, dims), build_onevision_processor(tokenizer, dims)
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]
    prompts = ["USER: <video>\nwhat color is the square ? ASSISTANT:", "USER: <video>\nhow many ? ASSISTANT:"]
    compress(model, "auto:0.5", "cls_attn")
    model(**processor(videos=clips, text=prompts, return_tensors="pt", padding=True))
    per_frame = model.compression.stats.kept_per_frame
    singles = []
    for clip, prompt in zip(clips, prompts):
        model(**processor(videos=[clip], text=[prompt], return_tensors="pt"))
        singles += model.compression.stats.kept_per_frame
    assert per_frame == singles and all(1 <= c < 16 for frames in per_frame for c in frames)
    assert model.compression.stats.kept_per_image == [sum(f) + 1 for f in singles[-1:]]  # the closing newline kept
    restore(model)


@pytest.mark.parametrize("method", ["hired", "globalcom2", "visionzip"])
def test_auto_on_anyres_images(tokenizer, method):
    model, processor = build_llava_next(tokenizer), build_next_processor(tokenizer)
    images = random_images(2, (60, 120)) + random_images(1, (120, 60), seed=3)
    prompts = ["USER: <image>\nwhat color is the square ? ASSISTANT:", "USER: <image>\nhow many ? ASSISTANT:",
               "USER: <image>\nis it red ? ASSISTANT:"]
    compress(model, "auto:0.5", method)
    model(**processor(images=images, text=prompts, return_tensors="pt", padding=True))
    counts, total = model.compression.stats.kept_per_image, model.compression.stats.visual_tokens_in
    singles = []
    for image, prompt in zip(images, prompts):
        model(**processor(images=[image], text=[prompt], return_tensors="pt"))
        singles += model.compression.stats.kept_per_image
    restore(model)
    assert counts == singles and 3 <= sum(counts) < total
