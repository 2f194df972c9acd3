"""Benchmark of speculative decoding on the embedded class-conditional image generator: what each acceptance rule
buys in speed, and what it costs in image quality, on the same samples.

    python -m vlm_compress.bench.speculative_bench      # → eval/results/speculative.{md,json}, speculative_grid.png,
                                                        #   speculative_delta.png

* Settings: plain sampling from ``tiny-imagegpt``; speculative decoding with the distilled ``tiny-imagegpt-drafter``
  (γ drafts per round) under the standard rule (δ = 0, lossless) and LANTERN at each δ; the same greedily.
* Per setting and class, ``--per-class`` images, one at a time (speculative decoding is a batch-1 method; plain
  decoding is timed the same way), all from one seeded generator: codes per second, wall-clock speed-up over plain
  decoding, τ (codes per target call) and the share of drafts accepted.
* Quality on the same samples (:mod:`.generation_quality`): the Fréchet distance of their tiny-llava tower features
  to those of ``tiny-vq`` reconstructions of real test scenes, and the shares the scene classifier assigns to the
  requested class and to its colour, beside the same figures for reconstructions of other real scenes (the ceiling of a generator
  over these codes) and for the real scenes.
* A Monte-Carlo check of the real decoding loop on a small random generator whose whole output law is computable:
  total variation of ``--mc-samples`` speculative draws to the exact law at δ = 0, beside the sampling noise of
  that many exact draws (and, for contrast, at δ > 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..speculative import (
    AcceptanceRule,
    GenerationStats,
    ImageGPT,
    ImageGPTConfig,
    LanternRule,
    Warp,
    generate,
    latent_neighbors,
    load_generator,
    speculative_generate,
)
from ..speculative.gpt import flops_per_token, parameter_count
from ..tokenizers_visual import load_tokenizer, to_uint8
from . import generation_data
from .generation_quality import SceneClassifier, TowerFeatures, accuracies, frechet_distance
from .timing import machine_description

RESULTS = Path(__file__).resolve().parents[2] / "eval" / "results"
DELTAS = (0.05, 0.1, 0.2)


def settings(deltas, greedy_deltas) -> list[dict]:
    rows = [{"name": "plain", "mode": "sample", "delta": None}, {"name": "speculative δ=0", "mode": "sample", "delta": 0.0}]
    rows += [{"name": f"LANTERN δ={d}", "mode": "sample", "delta": d} for d in deltas]
    rows += [{"name": "plain greedy", "mode": "greedy", "delta": None},
             {"name": "speculative greedy", "mode": "greedy", "delta": 0.0}]
    rows += [{"name": f"LANTERN greedy δ={d}", "mode": "greedy", "delta": d} for d in greedy_deltas]
    return rows


def run_setting(setting: dict, target, drafter, neighbors, classes: list[int], gamma: int, warp: Warp,
                cfg_scale: float, seed: int) -> tuple[torch.Tensor, dict]:
    """Codes ``[N, grid²]`` for ``classes`` (one call per image) and the setting's speed figures."""
    greedy = setting["mode"] == "greedy"
    generator = torch.Generator().manual_seed(seed)
    rule = AcceptanceRule() if not setting["delta"] else LanternRule(neighbors, delta=setting["delta"])
    rows, parts = [], []
    for c in classes:
        if setting["delta"] is None:
            out, stats = generate(target, [c], warp=warp, greedy=greedy, cfg_scale=cfg_scale, generator=generator)
        else:
            out, stats = speculative_generate(target, drafter, [c], gamma=gamma, rule=rule, warp=warp, greedy=greedy,
                                              cfg_scale=cfg_scale, generator=generator)
        rows.append(out)
        parts.append(stats)
    total = GenerationStats.total(parts)
    figures = {"images": len(classes), "seconds": total.seconds, "codes_per_second": total.codes_per_second,
               "mean_accepted_length": total.mean_accepted_length, "acceptance_rate": total.acceptance_rate}
    return torch.cat(rows), figures


@torch.no_grad()
def reconstruct(vq, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vq.decode(vq.encode(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def quality(vq, classifier, tower, codes, classes, reference_features) -> dict:
    images = torch.cat([vq.decode(codes[i:i + 256]) for i in range(0, len(codes), 256)])
    return {"fd": frechet_distance(tower(images), reference_features),
            **accuracies(classifier.predict(images), torch.as_tensor(classes))}


@torch.no_grad()
def monte_carlo_check(samples: int, deltas=(0.0, 0.1, 0.2), seed: int = 0) -> list[dict]:
    """TV between ``samples`` speculative draws of 3 codes and the exact law of a small random generator (V = 4,
    64 sequences), per δ, with the mean TV of as many exact draws (the noise floor)."""
    def model(s, depth):
        torch.manual_seed(s)
        m = ImageGPT(ImageGPTConfig(codebook_size=4, num_classes=3, grid=2, width=32, depth=depth, heads=2,
                                    mlp_hidden=64)).eval()
        for p in m.parameters():
            p.mul_(3.0)  # a spread target: perplexity ≈ 17 over the 64 sequences
        return m

    target, drafter = model(5, 2), model(6, 1)
    warp = Warp(temperature=0.9)
    exact = {}
    for seq in itertools.product(range(4), repeat=3):
        logits = target(torch.tensor([[4 + 1, *seq[:2]]]))[0]
        exact[seq] = math.prod(float(warp(logits[i])[c]) for i, c in enumerate(seq))
    noise = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * samples)) for p in exact.values())
    neighbors = latent_neighbors(torch.tensor([[0.0], [1.0], [2.5], [4.0]]), k=2)
    rows = []
    for delta in deltas:
        rule = AcceptanceRule() if delta == 0 else LanternRule(neighbors, delta=delta)
        g, counts = torch.Generator().manual_seed(seed), Counter()
        for _ in range(samples):
            out, _ = speculative_generate(target, drafter, [1], gamma=2, num_codes=3, rule=rule, warp=warp, generator=g)
            counts[tuple(out[0].tolist())] += 1
        tv = 0.5 * sum(abs(counts.get(k, 0) / samples - p) for k, p in exact.items())
        rows.append({"delta": delta, "samples": samples, "tv": tv, "noise_tv": noise})
    return rows


def sample_grid(vq, per_setting: dict[str, torch.Tensor], classes: list[int], shown: int = 2, scale: int = 1) -> Image.Image:
    """Rows: classes; columns: ``shown`` samples of each setting, a header with the setting names."""
    names = list(per_setting)
    size, pad, header, label = 64 * scale, 3, 16, 92
    width = label + len(names) * (shown * (size + pad) + 2 * pad)
    grid = Image.new("RGB", (width, header + generation_data.NUM_CLASSES * (size + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(names):
        x0 = label + col * (shown * (size + pad) + 2 * pad)
        draw.text((x0 + 2, 2), name, fill="black")
        codes = per_setting[name]
        for cls in range(generation_data.NUM_CLASSES):
            rows = [i for i, c in enumerate(classes) if c == cls][:shown]
            images = to_uint8(vq.decode(codes[rows]))
            for j, image in enumerate(images):
                tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
                grid.paste(tile, (x0 + j * (size + pad), header + cls * (size + pad)))
    for cls, name in enumerate(generation_data.CLASS_NAMES):
        draw.text((3, header + cls * (size + pad) + size // 2 - 6), name, fill="black")
    return grid


def delta_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampled = [r for r in rows if r["mode"] == "sample" and r["delta"] is not None]
    deltas = [r["delta"] for r in sampled]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(deltas, [r["mean_accepted_length"] for r in sampled], "o-")
    axes[0].set(xlabel="δ", ylabel="τ (codes per target call)", title="accepted length")
    axes[1].plot(deltas, [r["speedup"] for r in sampled], "o-", color="C2")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(xlabel="δ", ylabel="× plain decoding", title="wall-clock speed-up")
    ax = axes[2]
    ax.plot(deltas, [r["fd"] for r in sampled], "o-", color="C3", label="Fréchet distance")
    ax.set(xlabel="δ", ylabel="FD (tower features)", title="quality")
    twin = ax.twinx()
    twin.plot(deltas, [100 * r["class_accuracy"] for r in sampled], "s--", color="C1", label="class accuracy")
    twin.plot(deltas, [100 * r["colour_accuracy"] for r in sampled], "^:", color="C4", label="colour accuracy")
    twin.set_ylabel("accuracy (%)")
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# Speculative decoding of the embedded image generator", "",
             f"`{report['command']}` on {report['machine']['cpu']} ({report['machine']['threads']} threads), torch "
             f"{report['machine']['torch']}. Target `{cfg['target']}` ({cfg['target_parameters'] / 1e6:.2f} M "
             f"parameters), drafter `{cfg['drafter']}` ({cfg['drafter_parameters'] / 1e6:.2f} M; "
             f"{100 * cfg['drafter_flops_share']:.0f} % of the target's FLOPs per code), codes of `{cfg['vq']}` "
             f"({cfg['codes']} per image, {cfg['codebook_size']} in the codebook). γ = {cfg['gamma']} drafts per round, "
             f"LANTERN k = {cfg['lantern_k']} nearest codes; sampling at temperature {cfg['temperature']}, "
             f"top-k {cfg['top_k']}, top-p {cfg['top_p']}, CFG {cfg['cfg_scale']}. {cfg['per_class']} images per class "
             f"× {cfg['classes']} classes per setting, one at a time, seeded.", "",
             "| setting | τ (codes / target call) | drafts accepted | codes/s | speed-up | FD ↓ | class accuracy | "
             "colour accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        fd = f"{r['fd']:.3f}" if "fd" in r else "—"
        acc = (f"{100 * r['class_accuracy']:.1f} % | {100 * r['colour_accuracy']:.1f} %" if "class_accuracy" in r
               else "— | —")
        accepted = "—" if r["delta"] is None else f"{100 * r['acceptance_rate']:.1f} %"
        lines.append(f"| {r['name']} | {r['mean_accepted_length']:.2f} | {accepted} | {r['codes_per_second']:.0f} | "
                     f"{r['speedup']:.2f}× | {fd} | {acc} |")
    ref = report["reference"]
    lines += ["", f"FD is the Fréchet distance of tiny-llava tower features to those of `{cfg['vq']}` reconstructions of "
              f"{ref['reference_images']} real test scenes (the generator can only make what the codes carry; the "
              f"scenes' pixel noise is not among it). Floors at the same sample size, {ref['images']} other test "
              f"scenes: their reconstructions FD {ref['fd']:.3f}, class accuracy {100 * ref['class_accuracy']:.1f} %, "
              f"colour accuracy {100 * ref['colour_accuracy']:.1f} % (a perfect generator over these codes: the codes "
              f"blur the 5–7-pixel objects into blobs of roughly their colour, so shape is mostly lost); the real "
              f"scenes FD {ref['real_fd']:.3f}, class accuracy {100 * ref['real_class_accuracy']:.1f} %, colour "
              f"accuracy {100 * ref['real_colour_accuracy']:.1f} %. Greedy rows make one image per class (no FD).", ""]
    if report["monte_carlo"]:
        lines += ["## Monte-Carlo check of the decoding loop", "",
                  "A random generator with 4 codes and 3 positions (64 sequences, exact law by enumeration), γ = 2, "
                  "temperature 0.9; total variation of the empirical law of the speculative samples to the exact law:",
                  "", "| δ | samples | TV to the exact law | TV of as many exact draws (mean) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['delta']} | {r['samples']} | {r['tv']:.4f} | {r['noise_tv']:.4f} |"
                  for r in report["monte_carlo"]]
        lines += ["", "At δ = 0 the TV is at the sampling noise: the rule is lossless. LANTERN's δ bounds each step's "
                  "relaxed target, not the output law, which moves further (reference §7.3).", ""]
    lines += ["![samples](speculative_grid.png)", "", "![δ](speculative_delta.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tiny-imagegpt")
    parser.add_argument("--drafter", default="tiny-imagegpt-drafter")
    parser.add_argument("--vq", default="tiny-vq")
    parser.add_argument("--classifier", default=None, help="SceneClassifier folder (default: the embedded one).")
    parser.add_argument("--per-class", type=int, default=20, help="Images per class and setting.")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--lantern-k", type=int, default=32, help="Neighbours per code (LANTERN's k).")
    parser.add_argument("--deltas", type=float, nargs="+", default=list(DELTAS))
    parser.add_argument("--greedy-deltas", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--reference-images", type=int, default=2000, help="Real test scenes FD compares with.")
    parser.add_argument("--mc-samples", type=int, default=20000, help="Draws of the Monte-Carlo check (0: skip).")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target, drafter, vq = load_generator(args.target), load_generator(args.drafter), load_tokenizer(args.vq)
    classifier = SceneClassifier.from_pretrained(args.classifier) if args.classifier else SceneClassifier.from_pretrained()
    tower = TowerFeatures()
    neighbors = latent_neighbors(vq.codebook(), args.lantern_k)
    warp = Warp(args.temperature, args.top_k, args.top_p)
    classes = [c for c in range(generation_data.NUM_CLASSES) for _ in range(args.per_class)]
    real, _ = generation_data.class_scenes("test", 0, args.reference_images)
    reference_features = tower(reconstruct(vq, vq.preprocess(real)))
    # floors at a setting's sample size: other test scenes' reconstructions (a perfect generator over these codes),
    # and the real scenes themselves (their pixel noise is what no code carries)
    held, held_classes = generation_data.class_scenes("test", args.reference_images, len(classes))
    held = vq.preprocess(held)
    recon, labels = reconstruct(vq, held), torch.from_numpy(held_classes)
    reference = {"images": len(held), "reference_images": len(real),
                 "fd": frechet_distance(tower(recon), reference_features),
                 "real_fd": frechet_distance(tower(held), reference_features),
                 **accuracies(classifier.predict(recon), labels),
                 **{f"real_{k}": v for k, v in accuracies(classifier.predict(held), labels).items()}}
    generate(target, [0], warp=warp)  # warm-up
    rows, shown_codes = [], {}
    for setting in settings(args.deltas, args.greedy_deltas):
        wanted = classes if setting["mode"] == "sample" else list(range(generation_data.NUM_CLASSES))
        codes, figures = run_setting(setting, target, drafter, neighbors, wanted, args.gamma, warp, args.cfg_scale,
                                     args.seed)
        row = {**setting, **figures}
        if setting["mode"] == "sample":
            row.update(quality(vq, classifier, tower, codes, wanted, reference_features))
            shown_codes[setting["name"]] = codes
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        base = next(r for r in rows if r["delta"] is None and r["mode"] == row["mode"])
        row["speedup"] = row["codes_per_second"] / base["codes_per_second"]
    shown = sys.argv[1:] if argv is None else argv
    report = {
        "command": " ".join(["python -m vlm_compress.bench.speculative_bench", *shown]),
        "machine": machine_description(torch.device("cpu")),
        "config": {"target": args.target, "drafter": args.drafter, "vq": args.vq, "gamma": args.gamma,
                   "lantern_k": args.lantern_k, "temperature": args.temperature, "top_k": args.top_k,
                   "top_p": args.top_p, "cfg_scale": args.cfg_scale, "per_class": args.per_class,
                   "classes": generation_data.NUM_CLASSES, "codes": target.config.num_codes,
                   "codebook_size": vq.codebook_size, "target_parameters": parameter_count(target),
                   "drafter_parameters": parameter_count(drafter),
                   "drafter_flops_share": flops_per_token(drafter.config, 32) / flops_per_token(target.config, 32)},
        "reference": reference, "rows": rows,
        "monte_carlo": monte_carlo_check(args.mc_samples) if args.mc_samples else [],
    }
    sample_grid(vq, shown_codes, classes).save(out / "speculative_grid.png")
    delta_plot(rows, out / "speculative_delta.png")
    (out / "speculative.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "speculative.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
