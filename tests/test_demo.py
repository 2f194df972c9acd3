"""The demo's UI-free parts: overlay masks on LLaVA-1.5 and AnyRes layouts, input checks, one comparison."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_compress.adapters import get_adapter
from vlm_compress.adapters.base import TokenLayout
from vlm_compress.demo.compare import DemoInputError, compare, load_model, read_image
from vlm_compress.demo.overlay import DROPPED, KEPT, MERGED, render_overlay, token_states
from vlm_compress.testing import build_llava_next, build_next_processor, random_images


def test_llava15_kept_indices_land_on_their_grid_cells():
    layout = TokenLayout.single_grid((3, 4))
    states = token_states(layout, torch.tensor([0, 5, 11]), merged_into=torch.tensor([0] + [-1] * 4 + [1] * 3 + [-1] * 4))
    expected = np.full((3, 4), DROPPED)
    expected[0, 0] = expected[1, 1] = expected[2, 3] = KEPT  # 5 → (1, 1), 11 → (2, 3)
    expected[1, 2] = expected[1, 3] = MERGED  # tokens 6, 7 merged into slot 1
    assert list(states) == [0] and np.array_equal(states[0], expected)


def test_anyres_kept_indices_land_on_thumbnail_and_high_resolution_cells(tokenizer):
    model, processor = build_llava_next(tokenizer), build_next_processor(tokenizer)
    image = random_images(1, (84, 56))[0]  # taller than wide: an unpadded high-resolution grid
    inputs = processor(images=[image], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    layout = get_adapter(model).encode_images(inputs["pixel_values"], image_sizes=inputs["image_sizes"])[0].layout
    thumb, hires = layout.tokens_of(0), layout.tokens_of(1)
    rows, cols = layout.grids[1]
    kept = torch.stack([thumb[0], hires[cols + 1], hires[-1], layout.newline.nonzero()[0, 0]])  # a newline too
    states = token_states(layout, kept)
    assert sorted(states) == [0, 1]
    assert np.argwhere(states[0] == KEPT).tolist() == [[0, 0]]
    assert np.argwhere(states[1] == KEPT).tolist() == [[1, 1], [rows - 1, cols - 1]]  # the newline has no cell
    overlay = render_overlay(image, states, min_side=0)
    assert overlay.size == (2 * image.size[0] + 6, image.size[1])  # one panel per grid


def test_overlay_darkens_dropped_cells_and_keeps_kept_ones():
    image = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    states = {0: np.array([[KEPT, DROPPED], [MERGED, DROPPED]], np.uint8)}
    out = np.asarray(render_overlay(image, states, min_side=0)).astype(int)
    assert out[10, 10].tolist() == [200, 200, 200] and out[10, 30].tolist() == [50, 50, 50]
    assert out[30, 10, 2] > out[30, 10, 0]  # merged: tinted blue


def test_bad_inputs_get_messages(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(DemoInputError, match="notes.txt is not an image"):
        read_image(str(text))
    with pytest.raises(DemoInputError, match="choose an example image"):
        read_image(None)
    huge, note = read_image(Image.new("RGB", (4000, 1000)))
    assert huge.size == (1024, 256) and "downscaled" in note
    with pytest.raises(DemoInputError, match="no model at"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(DemoInputError, match="did not load"):
        load_model(str(tmp_path / "broken"))


def test_comparison_on_the_embedded_model():
    model, processor = load_model(None)
    from vlm_compress.demo.examples import example_images

    image = example_images(1)["ShapesVQA scene 1"]
    with pytest.raises(DemoInputError, match="type a question"):
        compare(model, processor, image, "  ", ["cls_attn"], [0.5])
    reference, outcomes, note = compare(model, processor, image, "what color is the circle ?",
                                        ["cls_attn", "fastv:layer=1"], [0.5, 0.22])
    assert reference.answer and reference.visual_tokens == 144
    assert [(o.method, o.budget) for o in outcomes] == [("cls_attn", 0.5), ("cls_attn", 0.22), ("fastv:layer=1", 0.5)]
    assert "fastv:layer=1 @ 0.22" in note  # unreachable on 4 layers: skipped with the reason
    assert outcomes[1].visual_tokens == round(0.22 * 144) and outcomes[1].flops_percent < 50
    assert all(o.overlay is not None and o.answer for o in outcomes)
