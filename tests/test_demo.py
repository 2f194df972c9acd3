"""The demo's UI-free parts: overlay masks on LLaVA-1.5 and AnyRes layouts, input checks, one comparison; per-frame
masks and strips of a video, a video comparison on a random OneVision saved to a temp dir, video input checks."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_compress.adapters import get_adapter
from vlm_compress.adapters.base import TokenLayout
from vlm_compress.demo.compare import DemoInputError, compare, load_model, read_image
from vlm_compress.demo.examples import example_clips
from vlm_compress.demo.overlay import DROPPED, KEPT, MERGED, render_overlay, token_states
from vlm_compress.demo.video import check_video_model, compare_video, frame_states, read_clip, render_strip
from vlm_compress.testing import (
    LlavaDims, build_llava, build_llava_next, build_next_processor, build_onevision, build_onevision_processor,
    random_images,
)

VIDEO_DIMS = LlavaDims(image_size=96, patch_size=8)  # the embedded tiny-onevision's input: 6×6 = 36 tokens a frame


def test_llava15_kept_indices_land_on_their_grid_cells():
    layout = TokenLayout.single_grid((3, 4))
    merged = torch.tensor([0] + [-1] * 4 + [1] * 3 + [-1] * 4)
    states = token_states(layout, torch.tensor([0, 5, 11]), merged_into=merged)
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


def test_video_kept_indices_land_on_their_frames_cells():
    layout = TokenLayout.single_grid((2, 2))  # 4 tokens a frame; 3 frames; token 12 is the closing newline
    merged = torch.tensor([0, -1, -1, -1, -1, 1, 2, 1, -1, -1, -1, -1, 3])
    states = frame_states(layout, 3, torch.tensor([0, 5, 6, 12]), merged)
    assert [s.tolist() for s in states] == [[[KEPT, DROPPED], [DROPPED, DROPPED]],
                                            [[DROPPED, KEPT], [KEPT, MERGED]],
                                            [[DROPPED, DROPPED], [DROPPED, DROPPED]]]
    frames = np.full((3, 40, 40, 3), 200, np.uint8)
    one = render_strip(frames[:1], states[:1], [1], thumb=40, gap=4)
    three = render_strip(frames, states, [1, 3, 0], [0.9, 0.5, 0.1], thumb=40, gap=4)
    assert one.width == 40 and three.width == 3 * 40 + 2 * 4 and three.height > one.height  # a score line
    pixels = np.asarray(three).astype(int)
    assert pixels[10, 10].tolist() == [200, 200, 200] and pixels[10, 2 * 44 + 10].tolist() == [50, 50, 50]


@pytest.fixture(scope="module")
def video_model(tokenizer, tmp_path_factory):
    """A random-weight OneVision with the embedded one's sizes, loaded from a directory (QuoTA reads the
    tokenizer from there)."""
    path = tmp_path_factory.mktemp("tiny-onevision-random")
    build_onevision(tokenizer, VIDEO_DIMS, tower="clip").save_pretrained(path)
    build_onevision_processor(tokenizer, VIDEO_DIMS, tower="clip").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(str(path))


def test_video_comparison_on_a_random_model(video_model):
    model, processor = video_model
    clip = next(iter(example_clips(1).values()))
    reference, outcomes, note = compare_video(model, processor, clip.frames, clip.question,
                                              ["quota", "quota:assign=uniform"], [0.25, 0.1])
    assert note == "" and reference.answer and reference.visual_tokens == 8 * 36 + 1
    assert [(o.method, o.budget) for o in outcomes] == [("quota", 0.25), ("quota", 0.1),
                                                        ("quota:assign=uniform", 0.25), ("quota:assign=uniform", 0.1)]
    for o in outcomes:
        assert o.answer and o.visual_tokens_full == 289 and o.visual_tokens == round(o.budget * 289)
        assert len(o.kept_per_frame) == 8 and sum(o.kept_per_frame) == o.visual_tokens - 1  # the newline is kept
        assert o.per_frame == "·".join(map(str, o.kept_per_frame))
        assert isinstance(o.strip, Image.Image) and o.strip.width == 8 * 144 + 7 * 4
        scored = o.method == "quota"
        assert (o.frame_scores is not None) == scored and (o.scoring_ms > 0) == scored
        if scored:
            assert len(o.frame_scores) == 8 and all(0 <= s <= 1 for s in o.frame_scores)
    _, short, _ = compare_video(model, processor, clip.frames[:3], clip.question, ["quota:assign=uniform"], [0.25])
    assert short[0].strip.width == 3 * 144 + 2 * 4 < outcomes[0].strip.width  # one thumbnail a frame
    assert short[0].strip.height < outcomes[0].strip.height  # no score line without scores


def test_an_uploaded_video_of_another_size_is_sampled_and_resized(video_model, tmp_path):
    from vlm_compress.video import write_video

    pytest.importorskip("av")
    model, processor = video_model
    path = tmp_path / "wide.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8))
    reference, outcomes, note = compare_video(model, processor, str(path), "what color is the triangle ?",
                                              ["cls_attn"], [0.5], num_frames=5)
    assert "wide.mp4: 5 of its 10 frames" in note
    assert reference.visual_tokens == 5 * 36 + 1  # each frame resized to the model's 96×96 input
    assert len(outcomes[0].kept_per_frame) == 5 and sum(outcomes[0].kept_per_frame) == outcomes[0].visual_tokens - 1


def test_bad_video_inputs_get_messages(video_model, tokenizer, processor, tmp_path):
    model, video_processor = video_model
    frames = next(iter(example_clips(1).values())).frames
    png = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(png)
    with pytest.raises(DemoInputError, match=r"x\.png is not a video this demo can read .*upload an MP4, WebM or AVI"):
        compare_video(model, video_processor, str(png), "what ?", ["quota"], [0.5])
    with pytest.raises(DemoInputError, match="gone.mp4 is no longer on the server; upload it again"):
        read_clip(str(tmp_path / "gone.mp4"))
    with pytest.raises(DemoInputError, match="type a question about the video"):
        compare_video(model, video_processor, frames, "  ", ["quota"], [0.5])
    with pytest.raises(DemoInputError, match="choose at least one method"):
        compare_video(model, video_processor, frames, "what ?", [], [0.5])
    with pytest.raises(DemoInputError, match="choose a bundled clip or upload a video"):
        compare_video(model, video_processor, None, "what ?", ["quota"], [0.5])
    with pytest.raises(DemoInputError, match="frames to sample must be a whole number from 1 to 32"):
        read_clip(str(png), 0)
    with pytest.raises(DemoInputError, match="takes no videos: give a LLaVA-OneVision checkpoint"):
        check_video_model(build_llava(tokenizer), processor)
