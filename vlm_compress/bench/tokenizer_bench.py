"""Benchmark of the embedded image tokenizers on held-out 64×64 scenes: what each token count buys, and how fast.

    python -m vlm_compress.bench.tokenizer_bench            # tiny-flextok and tiny-seed → eval/results/tokenizers.*

* **FlexTok**: PSNR (and MSE) of the reconstruction against the input at 1, 4, 16, 64 and 256 tokens, with the
  model's default sampler (seeded, so reruns are identical). Coarse-to-fine means PSNR rises with tokens.
* **SEED**: share of the codebook used on the test split, its perplexity, cosine of the reconstructed image
  embedding to the CLIP target's (with the no-information baseline: the mean target), retrieval@1 of each
  image's own target among the split, and the pixel decoder's PSNR.
* **Speed**: encode and decode images per second on this machine (batch 16, best of 3 after a warm-up).
* **Pictures**: ``tokenizers_grid.png``: each row a test scene, then FlexTok at 1/4/16/64/256 tokens, then SEED.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..tokenizers_visual import psnr, to_uint8
from ..tokenizers_visual.quantizers import perplexity
from ..tokenizers_visual.seed import embedding_fidelity
from ..tokenizers_visual.checkpoints import load_tokenizer
from .timing import machine_description
from .tokenizer_data import scene_images

RESULTS = Path(__file__).resolve().parents[2] / "eval" / "results"
LENGTHS = (1, 4, 16, 64, 256)


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def flextok_quality(model, pixels: torch.Tensor, lengths=LENGTHS, batch: int = 32) -> list[dict]:
    """Per prefix length: mean/std PSNR and MSE over ``pixels [N, 3, S, S]`` with the default sampler (seeded), and
    the PSNR of a single Euler step from pure noise, the decoder's estimate of the mean image given the tokens."""
    ids = torch.cat([model.encode(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    rows = []
    for k in lengths:
        k = min(k, model.max_tokens)
        recon = torch.cat([model.decode(ids[i:i + batch, :k], generator=_seeded())
                           for i in range(0, len(pixels), batch)])
        one_step = torch.cat([model.decode(ids[i:i + batch, :k], steps=1, generator=_seeded())
                              for i in range(0, len(pixels), batch)])
        values = psnr(pixels, recon)
        mse = (pixels - recon).pow(2).flatten(1).mean(1)
        rows.append({"tokens": k, "bits": round(k * math.log2(model.codebook_size)), "psnr": float(values.mean()),
                     "psnr_std": float(values.std()), "mse": float(mse.mean()),
                     "psnr_one_step": float(psnr(pixels, one_step).mean())})
    return rows


@torch.no_grad()
def seed_quality(model, pixels: torch.Tensor, batch: int = 64) -> dict:
    """SEED's figures on ``pixels``: codebook use and perplexity over all codes, embedding fidelity, PSNR."""
    ids = torch.cat([model.encode(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    counts = torch.bincount(ids.flatten(), minlength=model.codebook_size)
    embeds = torch.cat([model.image_embedding(ids[i:i + batch]) for i in range(0, len(ids), batch)])
    target = torch.cat([model.target_embedding(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    recon = torch.cat([model.decode(ids[i:i + batch]) for i in range(0, len(ids), batch)])
    return {
        "images": len(pixels), "codes_drawn": int(ids.numel()), "codebook_size": model.codebook_size,
        "codes_used": int((counts > 0).sum()), "codes_used_share": float((counts > 0).float().mean()),
        "perplexity": perplexity(counts), **embedding_fidelity(embeds, target),
        "pixel_psnr": float(psnr(pixels, recon).mean()),
    }


@torch.no_grad()
def speed(model, pixels: torch.Tensor, tokens: int, repeats: int = 3) -> dict:
    """Images per second of ``encode`` and of ``decode`` at ``tokens`` on a batch (best of ``repeats``)."""
    ids = model.encode(pixels, budget=tokens)
    model.decode(ids, generator=_seeded())  # warm-up

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return len(pixels) / min(times)

    return {"batch": len(pixels), "repeats": repeats, "tokens": tokens, "encode_images_per_s": best(lambda: model.encode(pixels)),
            "decode_images_per_s": best(lambda: model.decode(ids, generator=_seeded()))}


def reconstruction_grid(flextok, seed, pixels: torch.Tensor, lengths=LENGTHS, scale: int = 3) -> Image.Image:
    """Rows of (original | FlexTok at each length | SEED), upscaled ``scale``× nearest, with a header."""
    columns = [("original", pixels)]
    ids = flextok.encode(pixels)
    for k in lengths:
        columns.append((f"FlexTok {k}", flextok.decode(ids[:, :k], generator=_seeded())))
    if seed is not None:
        columns.append((f"SEED {seed.max_tokens}", seed.decode(seed.encode(pixels))))
    size = pixels.shape[-1] * scale
    pad, header = 4, 18
    grid = Image.new("RGB", (len(columns) * (size + pad) + pad, len(pixels) * (size + pad) + pad + header), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        x = pad + c * (size + pad)
        draw.text((x + 2, 3), title, fill="black")
        for r, image in enumerate(to_uint8(images)):
            tile = Image.fromarray(image).resize((size, size), Image.NEAREST)
            grid.paste(tile, (x, header + pad + r * (size + pad)))
    return grid


def markdown(report: dict) -> str:
    lines = ["# Image tokenizers on 64×64 scenes", "",
             f"`{report['command']}` on {report['machine']['cpu']} ({report['machine']['threads']} threads), "
             f"torch {report['machine']['torch']}. Test split: {report['flextok']['images']} scenes for FlexTok, "
             f"{report['seed']['images']} for SEED. Decoding is seeded (generator 0).", ""]
    ft = report["flextok"]
    lines += [f"## FlexTok (`{ft['model']}`, {ft['parameters'] / 1e6:.2f} M parameters, FSQ {ft['levels']} = "
              f"{ft['codebook_size']} codes, {ft['steps']} Euler steps, guidance {ft['guidance_scale']})", "",
              f"| tokens | bits | PSNR (dB), {ft['steps']} steps | ± std | MSE | PSNR (dB), 1 step (mean estimate) |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['bits']} | {r['psnr']:.2f} | {r['psnr_std']:.2f} | {r['mse']:.5f} | "
              f"{r['psnr_one_step']:.2f} |" for r in ft["quality"]]
    lines += ["", "The sampler draws the detail it was not given (here, mostly the scenes' pixel noise), so its PSNR "
              "sits below the one-step estimate of the mean image; both should rise with tokens."]
    sd = report["seed"]
    lines += ["", f"## SEED (`{sd['model']}`, {sd['parameters'] / 1e6:.2f} M parameters, {sd['codebook_size']} codes × "
              f"{sd['tokens']} tokens)", "", "| figure | value |", "|---|---:|",
              f"| codebook used on the test split | {sd['codes_used']} / {sd['codebook_size']} "
              f"({100 * sd['codes_used_share']:.1f} %, of {sd['codes_drawn']} codes drawn) |",
              f"| code perplexity | {sd['perplexity']:.1f} |",
              f"| cosine, reconstructed vs target image embedding | {sd['embedding_cosine']:.4f} |",
              f"| cosine, mean target vs target (no-information baseline) | {sd['mean_target_cosine']:.4f} |",
              f"| cosine after subtracting the mean target | {sd['centered_cosine']:.4f} |",
              f"| retrieval@1 of the own target among {sd['images']} | {sd['retrieval_at_1']:.3f} "
              f"(chance {1 / sd['images']:.3f}) |",
              f"| pixel decoder PSNR (dB) | {sd['pixel_psnr']:.2f} |"]
    s = report["flextok"]["speed"]
    lines += ["", f"## Speed (images/s, batch of {s['batch']}, best of {s['repeats']})", "",
              "| tokenizer | tokens | encode | decode |", "|---|---:|---:|---:|"]
    for name in ("flextok", "seed"):
        s = report[name]["speed"]
        lines.append(f"| {name} | {s['tokens']} | {s['encode_images_per_s']:.1f} | {s['decode_images_per_s']:.1f} |")
    lines += ["", "![reconstructions](tokenizers_grid.png)", "",
              "Grid: test scenes, FlexTok at 1/4/16/64/256 tokens, SEED at 32 (SEED reconstructs a semantic "
              "embedding, not pixels: its pictures are the pixel decoder's reading of that embedding).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flextok", default="tiny-flextok", help="FlexTok folder or embedded name.")
    parser.add_argument("--seed", default="tiny-seed", help="SEED folder or embedded name.")
    parser.add_argument("--images", type=int, default=64, help="Test scenes for FlexTok's PSNR table.")
    parser.add_argument("--seed-images", type=int, default=256, help="Test scenes for SEED's figures.")
    parser.add_argument("--grid-rows", type=int, default=6)
    parser.add_argument("--speed-batch", type=int, default=16, help="Images per timed encode/decode call.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls; the best counts.")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flextok, seed = load_tokenizer(args.flextok), load_tokenizer(args.seed)
    test = flextok.preprocess(scene_images("test", 0, max(args.images, args.seed_images, args.speed_batch)))
    timed = test[:args.speed_batch]
    shown = sys.argv[1:] if argv is None else argv
    report = {"command": " ".join(["python -m vlm_compress.bench.tokenizer_bench", *shown]),
              "machine": machine_description(torch.device("cpu"))}
    report["flextok"] = {
        "model": args.flextok, "images": args.images, "parameters": sum(p.numel() for p in flextok.parameters()),
        "levels": flextok.config.levels, "codebook_size": flextok.codebook_size, "steps": flextok.config.timesteps,
        "guidance_scale": flextok.config.guidance_scale, "quality": flextok_quality(flextok, test[:args.images]),
        "speed": speed(flextok, timed, flextok.max_tokens, args.repeats)}
    report["seed"] = {"model": args.seed, "tokens": seed.max_tokens,
                      "parameters": sum(p.numel() for n, p in seed.named_parameters() if not n.startswith("target.")),
                      **seed_quality(seed, test[:args.seed_images]), "speed": speed(seed, timed, seed.max_tokens, args.repeats)}
    reconstruction_grid(flextok, seed, test[:args.grid_rows]).save(out / "tokenizers_grid.png")
    (out / "tokenizers.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tokenizers.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
