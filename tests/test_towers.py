"""Score hooks on every tower type, found by structure: CLIP and DINOv2 (CLS rows), SigLIP (no CLS: the received
attention substitute of vlm_compress.scoring). Each equals the tower's own eager attention weights, and a compressed
LLaVA on each tower keeps identity at budget 1.0 and batch == single."""

import pytest
import torch

from vlm_compress import compress, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.testing import TOWERS, build_llava, build_processor, random_images

PROMPT = "USER: <image>\nwhat color is the square ? ASSISTANT:"


@pytest.fixture(scope="module", params=TOWERS)
def tower_model(request, tokenizer):
    return request.param, build_llava(tokenizer, tower=request.param)


def eager_attentions(tower: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[I, H, T, T] per layer, from the tower itself under eager attention (restored to SDPA after)."""
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")


@pytest.mark.parametrize("layer", [0, -2, -1])
def test_first_row_scores_equal_eager_attention(tower_model, layer):
    name, model = tower_model
    adapter = get_adapter(model)
    tower = model.model.vision_tower
    assert adapter.tower_has_cls == (name != "siglip")
    assert tower.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with adapter.capture({layer: adapter.vision_attention(layer)}, False, {}) as capture, torch.no_grad():
        tower(pixels)
    ours = capture.first_row_attention(layer, "mean", "probs")
    eager = eager_attentions(tower, pixels)[layer]
    reference = eager[:, :, 0].mean(1) if name != "siglip" else eager.mean(2).mean(1)  # CLS row / received mean
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    maxed = capture.first_row_attention(layer, "max", "probs")
    torch.testing.assert_close(maxed, eager[:, :, 0].amax(1) if name != "siglip" else eager.mean(2).amax(1),
                               rtol=1e-5, atol=1e-6)


def test_all_rows_attention_means_equal_eager(tower_model):
    name, model = tower_model
    adapter = get_adapter(model)
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with adapter.capture({-2: adapter.vision_attention(-2)}, True, {}) as capture, torch.no_grad():
        tower(pixels)
    skip = 0 if name == "siglip" else 1
    received, given = capture.attention_means(-2, "probs", skip=skip)
    eager = eager_attentions(tower, pixels)[-2].mean(1)[:, skip:, skip:]
    torch.testing.assert_close(received, eager.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(given, eager.mean(2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["cls_attn", "visionzip", "fopru"])
def test_identity_and_batch_equals_single_on_each_tower(tower_model, tokenizer, method):
    name, model = tower_model
    processor = build_processor(tokenizer, tower=name)
    images = random_images(2, (56, 56), seed=3)
    batch = processor(images=images, text=[PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        stock = model(**batch).logits[:, -1]
    compressed = compress(model, method=method, budget=1.0)
    try:
        with torch.no_grad():
            torch.testing.assert_close(compressed(**batch).logits[:, -1], stock, rtol=1e-4, atol=1e-5)
    finally:
        restore(compressed)
    compressed = compress(model, method=method, budget=0.3)
    try:
        with torch.no_grad():
            both = compressed.generate(**batch, max_new_tokens=3, do_sample=False)
            for i in range(2):
                one = processor(images=images[i : i + 1], text=[PROMPT], return_tensors="pt")
                alone = compressed.generate(**one, max_new_tokens=3, do_sample=False)
                assert torch.equal(alone[0, one["input_ids"].shape[1]:], both[i, batch["input_ids"].shape[1]:])
        assert compressed.compression.stats.visual_tokens_kept < 2 * (56 // 14) ** 2
    finally:
        restore(compressed)
