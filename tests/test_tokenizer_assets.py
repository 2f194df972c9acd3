"""The shipped tokenizers (``tiny-flextok``, ``tiny-seed``) load offline by name, fit the size budget, behave as
trained tokenizers should on held-out scenes, and the benchmark runs end to end on them."""

import json

import pytest
import torch

from vlm_compress.bench.tokenizer_bench import main as bench_main
from vlm_compress.bench.tokenizer_data import scene_images
from vlm_compress.tokenizers_visual import FlexTokTokenizer, SeedTokenizer, load_tokenizer, psnr
from vlm_compress.tokenizers_visual.checkpoints import ASSETS, EMBEDDED


def test_shipped_tokenizers_fit_in_10_mb():
    size = sum(f.stat().st_size for name in EMBEDDED for f in (ASSETS / name).rglob("*") if f.is_file())
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB"


@pytest.fixture(scope="module")
def flextok():
    return load_tokenizer("tiny-flextok")


@pytest.fixture(scope="module")
def seed():
    return load_tokenizer("tiny-seed")


def test_flextok_loads_by_name_and_more_tokens_reconstruct_better(flextok):
    assert isinstance(flextok, FlexTokTokenizer) and flextok.max_tokens == 256 and flextok.codebook_size == 64000
    pixels = flextok.preprocess(scene_images("test", 0, 8))
    ids = flextok.encode(pixels)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # the one-step decode is the decoder's mean image given the tokens: more tokens, closer to the input
    coarse, mid, fine = (float(psnr(pixels, flextok.decode(ids[:, :k], steps=1, generator=g())).mean())
                         for k in (1, 16, 256))
    assert coarse + 0.3 < mid < fine, (coarse, mid, fine)


def test_seed_loads_by_name_with_its_target_and_its_embedding_beats_chance(seed):
    assert isinstance(seed, SeedTokenizer) and seed.max_tokens == 32 and seed.target is not None
    pixels = seed.preprocess(scene_images("test", 0, 32))
    figures = seed.evaluate(pixels)
    assert figures["retrieval_at_1"] > 3 / 32  # chance is 1/32
    assert figures["centered_cosine"] > 0.5


def test_tokenizer_bench_runs_end_to_end(tmp_path):
    bench_main(["--images", "2", "--seed-images", "8", "--grid-rows", "2", "--speed-batch", "2", "--repeats", "1",
                "--out", str(tmp_path)])
    report = json.loads((tmp_path / "tokenizers.json").read_text())
    assert [r["tokens"] for r in report["flextok"]["quality"]] == [1, 4, 16, 64, 256]
    assert report["seed"]["codes_drawn"] == 8 * 32
    assert (tmp_path / "tokenizers_grid.png").stat().st_size > 1000
    assert "| 256 |" in (tmp_path / "tokenizers.md").read_text()
