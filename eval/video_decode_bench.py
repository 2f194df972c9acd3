"""Video decode speed of :func:`vlm_compress.video.read_video`, per backend, on a synthetic clip.

    python eval/video_decode_bench.py                 # writes eval/results/video_decode.{json,md}
    python eval/video_decode_bench.py --repeats 9 --size 384 --frames 64 --fps 30

Writes a ``--frames``-frame ``--size``×``--size`` H.264 clip at ``--fps`` (a scrolling textured gradient and a moving
square: every frame differs, so the codec has real motion to encode) into a temporary directory, then times
``read_video(path, n)`` for n = all frames and n = 16 with each installed backend, ``--repeats`` times after one
warm-up read. frames/s = frames returned / median seconds per call (opening the file included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_compress.video import read_video, write_video  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_frames(count: int, size: int) -> np.ndarray:
    """[count, size, size, 3] uint8: a textured diagonal gradient scrolling right (the texture moves with it, so
    the encoder has real motion to compensate) and a white square moving down-right."""
    y, x = np.mgrid[0:size, 0:size]
    texture = np.random.default_rng(0).integers(0, 48, (size, size + 4 * count, 3), dtype=np.uint8)
    frames = np.empty((count, size, size, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = (x + 4 * t) % 200
        frames[t, ..., 1] = (y + x) // 3 % 200
        frames[t, ..., 2] = (y - 2 * t) % 200
        frames[t] += texture[:, 4 * count - 4 * t:][:, :size]
        top = (3 * t) % (size - size // 6)
        frames[t, top:top + size // 6, top:top + size // 6] = 255
    return frames


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def time_reads(path: str, num_frames: int, backend: str, repeats: int) -> dict[str, object]:
    clip = read_video(path, num_frames, backend=backend)  # warm-up: imports, thread pools, page cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        clip = read_video(path, num_frames, backend=backend)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"backend": backend, "num_frames": num_frames, "returned": len(clip), "median_s": round(median, 5),
            "min_s": round(min(seconds), 5), "frames_per_s": round(len(clip) / median, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="video_decode", help="output stem under eval/results")
    args = parser.parse_args()

    backends = [name for name in ("decord", "av") if version(name) is not None]
    load_before = os.getloadavg()[0]  # 2-core machines are often shared: say how busy this one was
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "synthetic.mp4")
        write_video(path, synthetic_frames(args.frames, args.size), fps=args.fps)
        clip_bytes = os.path.getsize(path)
        for backend in backends:
            for num_frames in (args.frames, 16):
                rows.append(time_reads(path, num_frames, backend, args.repeats))

    command = "python eval/video_decode_bench.py " + " ".join(sys.argv[1:])
    machine = {"processor": platform.processor(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
               "machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
               "decord": version("decord"), "av": version("av"), "load_avg_1m_before": round(load_before, 2),
               "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    clip = {"frames": args.frames, "size": f"{args.size}x{args.size}", "fps": args.fps, "codec": "libx264 yuv420p",
            "bytes": clip_bytes}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"command": command.strip(), "machine": machine,
                                                          "clip": clip, "repeats": args.repeats, "rows": rows},
                                                         indent=2) + "\n")
    lines = [
        "# Video decode speed (`vlm_compress.video.read_video`)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine['cpu']} (`platform.processor()`: {machine['processor'] or 'empty'}), "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, numpy {machine['numpy']}, "
        f"decord {machine['decord']}, av (PyAV) {machine['av']}; 1-minute load average {load_before:.2f} before, "
        f"{machine['load_avg_1m_after']:.2f} after.  ",
        f"Clip: synthetic, {args.frames} frames {args.size}×{args.size} at {args.fps:g} fps, libx264 yuv420p "
        f"({clip_bytes / 1024:.0f} KiB), written by `write_video`.",
        "",
        f"frames/s = frames returned / median seconds per `read_video` call ({args.repeats} repeats after a "
        "warm-up; opening the file included).",
        "",
        "| backend | num_frames | returned | median ms | min ms | frames/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['num_frames']} | {row['returned']} | {row['median_s'] * 1e3:.1f} | "
                     f"{row['min_s'] * 1e3:.1f} | {row['frames_per_s']:.0f} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
