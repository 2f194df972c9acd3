"""Compress a video VLM with QuoTA and with the uniform split of the same budget; print answers, tokens per frame and
QuoTA's frame scores.

    python examples/video_quickstart.py                 # offline: the embedded tiny-onevision on ShapesVideo clips
    python examples/video_quickstart.py --model PATH --video clip.mp4 --question "What happens?" --frames 16

PATH is a local LLaVA-OneVision checkpoint in transformers format. Without ``--model`` the example runs the shipped
``tiny-onevision`` (8 frames of 6×6 pooled tokens + 1 newline per clip) on three held-out clips whose answer sits
in one or two frames, and prints the true answer and the frames that hold it.
"""

from __future__ import annotations

import argparse

import torch

from vlm_compress import compress, restore
from vlm_compress.bench.data import ASSETS
from vlm_compress.bench.video_task import ShapesVideoTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local LLaVA-OneVision checkpoint directory (default: tiny-onevision)")
    parser.add_argument("--video", help="video file (default: held-out ShapesVideo clips)")
    parser.add_argument("--question", help="question (default: each clip's own)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled from --video")
    parser.add_argument("--budget", type=float, default=0.1)
    args = parser.parse_args()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = args.model or str(ASSETS / "tiny-onevision")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    if args.video:
        from vlm_compress.video import read_video

        clip = read_video(args.video, args.frames)
        print(f"{args.video}: {len(clip)} frames at {', '.join(f'{t:.1f}' for t in clip.timestamps)} s")
        cases = [(clip.frames, args.question or "What happens in the video?", None, None)]
    else:
        cases = [(s.frames, args.question or s.question, s.answer, s.key_frames)
                 for s in ShapesVideoTask().iterate("test", 3)]

    for frames, question, truth, key_frames in cases:
        inputs = processor(videos=[frames], text=[f"USER: <video>\n{question} ASSISTANT:"], return_tensors="pt")
        width = inputs["input_ids"].shape[1]

        def answer() -> str:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            return processor.batch_decode(out[:, width:], skip_special_tokens=True)[0].strip()

        known = f"  (true: {truth!r}, in frames {key_frames})" if truth is not None else ""
        print(f"Q: {question}{known}\n  uncompressed: {answer()!r}")
        for method, options in (("quota", {}), ("quota", {"assign": "uniform"})):
            compress(model, budget=args.budget, method=method, **options)
            try:
                text, stats = answer(), model.compression.stats
            finally:
                restore(model)
            label = "QuoTA" if not options else "uniform"
            scores = stats.frame_scores[0] if stats.frame_scores else None
            print(f"  {label} @ {args.budget}: {text!r}; tokens per frame {stats.kept_per_frame[0]}"
                  + (f"; frame scores {[round(s, 2) for s in scores]} ({stats.scoring_ms:.0f} ms scoring)"
                     if scores else ""))


if __name__ == "__main__":
    main()
