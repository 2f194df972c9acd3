"""The shipped generator stack (``tiny-vq``, ``tiny-imagegpt``, its drafter, the scene classifier) loads offline,
behaves as trained models should, and the speculative benchmark runs end to end on it."""

import json

import pytest
import torch

from vlm_compress.bench import generation_data
from vlm_compress.bench.generation_quality import SceneClassifier, accuracies, frechet_distance
from vlm_compress.bench.speculative_bench import main as bench_main
from vlm_compress.speculative import (
    EMBEDDED,
    LanternRule,
    generate,
    latent_neighbors,
    load_generator,
    speculative_generate,
)
from vlm_compress.speculative.checkpoints import ASSETS
from vlm_compress.tokenizers_visual import VQGANTokenizer, load_tokenizer, psnr


@pytest.fixture(scope="module")
def stack():
    return load_generator("tiny-imagegpt"), load_generator("tiny-imagegpt-drafter"), load_tokenizer("tiny-vq")


def test_frechet_distance_matches_its_closed_form():
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0, 0, 0.5, 0], dtype=torch.float64)
    assert abs(frechet_distance(a, a + shift) - float((shift**2).sum())) < 1e-6  # same covariance: ‖Δμ‖²
    cov = torch.cov(a.t())
    # b = 2a: ‖μ‖² + tr(Σ + 4Σ − 2·2Σ) = ‖μ‖² + tr(Σ)
    assert abs(frechet_distance(a, 2 * a) - float(a.mean(0).pow(2).sum() + cov.trace())) < 1e-6


def test_accuracies_count_the_class_and_its_colour_apart():
    names = generation_data.CLASS_NAMES
    red_circle, red_square, green_circle = (names.index(n) for n in ("red circle", "red square", "green circle"))
    got = accuracies(torch.tensor([red_circle, red_square, green_circle, red_square]),
                     torch.tensor([red_circle, red_circle, red_circle, red_square]))
    assert got == {"class_accuracy": 0.5, "colour_accuracy": 0.75}


def test_class_scenes_are_deterministic_and_show_their_class_colour():
    from vlm_compress.bench.task import COLORS

    for index in range(20):
        image, label = generation_data.class_scene("val", index)
        again, same = generation_data.class_scene("val", index)
        assert label == same and (image == again).all() and image.shape == (64, 64, 3)
        colour = torch.tensor(COLORS[generation_data.CLASSES[label][1]], dtype=torch.float)
        near = (torch.from_numpy(image).float() - colour).norm(dim=-1) < 40
        assert int(near.sum()) >= 2 * 12  # at least two objects' worth of pixels (a 5-pixel triangle has 15)
    rng_scene, forced = generation_data.class_scene("train", 3, label=5)
    assert forced == 5
    with pytest.raises(ValueError, match="class must lie"):
        generation_data.class_scene("train", 0, label=18)


def test_shipped_generators_fit_in_8_mb():
    names = [*EMBEDDED, "tiny-scene-classifier"]
    size = sum(f.stat().st_size for name in names for f in (ASSETS / name).rglob("*") if f.is_file())
    assert size <= 8 * 2**20, f"{size / 2**20:.1f} MB"


def test_vq_reconstructs_held_out_scenes_and_the_classifier_reads_them(stack):
    _, _, vq = stack
    assert isinstance(vq, VQGANTokenizer) and vq.max_tokens == 64
    images, labels = generation_data.class_scenes("test", 0, 64)
    pixels = vq.preprocess(images)
    recon = vq.decode(vq.encode(pixels))
    assert float(psnr(pixels, recon).mean()) > 22  # the scenes' pixel noise alone caps it near 25 dB
    classifier = SceneClassifier.from_pretrained()
    labels = torch.from_numpy(labels)
    assert accuracies(classifier.predict(pixels), labels)["class_accuracy"] > 0.95
    # the codes blur the 5-7-pixel objects into blobs: colour mostly survives, shape mostly not (chance: 1/6, 1/18)
    read = accuracies(classifier.predict(recon), labels)
    assert read["colour_accuracy"] > 0.7 and read["class_accuracy"] > 0.35


def test_target_generates_the_requested_classes(stack):
    target, _, vq = stack
    classes = list(range(generation_data.NUM_CLASSES)) * 2
    codes, _ = generate(target, classes, generator=torch.Generator().manual_seed(0))
    read = accuracies(SceneClassifier.from_pretrained().predict(vq.decode(codes)), torch.tensor(classes))
    assert read["colour_accuracy"] > 2 / 6 and read["class_accuracy"] > 2 / 18  # twice chance; ceiling ≈ 0.8 / 0.5


def test_greedy_speculative_equals_greedy_plain_on_the_shipped_models(stack):
    target, drafter, _ = stack
    plain, _ = generate(target, [0, 7, 13], greedy=True)
    spec, stats = speculative_generate(target, drafter, [0, 7, 13], gamma=4, greedy=True)
    assert torch.equal(spec, plain) and stats.mean_accepted_length > 1.2


def test_lantern_accepts_longer_runs_than_the_standard_rule(stack):
    target, drafter, vq = stack
    neighbors = latent_neighbors(vq.codebook(), 32)

    def tau(rule):
        g = torch.Generator().manual_seed(0)
        return speculative_generate(target, drafter, [1, 5, 9, 14], gamma=4, rule=rule, generator=g)[1]

    standard, relaxed = tau(None), tau(LanternRule(neighbors, delta=0.2))
    assert relaxed.mean_accepted_length > standard.mean_accepted_length


def test_speculative_bench_runs_end_to_end(tmp_path):
    bench_main(["--per-class", "1", "--mc-samples", "60", "--reference-images", "36", "--deltas", "0.1",
                "--greedy-deltas", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speculative.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["plain", "speculative δ=0", "LANTERN δ=0.1", "plain greedy", "speculative greedy"]
    assert all(r["speedup"] > 0 and r["mean_accepted_length"] >= 1 for r in report["rows"])
    assert all("fd" in r for r in report["rows"] if r["mode"] == "sample")
    assert [r["delta"] for r in report["monte_carlo"]] == [0.0, 0.1, 0.2]
    for name in ("speculative.md", "speculative_grid.png", "speculative_delta.png"):
        assert (tmp_path / name).stat().st_size > 0
