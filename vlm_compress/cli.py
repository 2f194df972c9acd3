"""``vlm-compress``: the console command. ``vlm-compress demo [...]`` starts the Gradio demo, ``vlm-compress bench
[...]`` runs the benchmark, ``vlm-compress export-vllm SRC DST --method M --budget B`` writes a checkpoint that
``vllm serve`` runs compressed (:mod:`vlm_compress.integrations.vllm`)."""

from __future__ import annotations

import sys

COMMANDS = ("demo", "bench", "export-vllm")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: vlm-compress {{{','.join(COMMANDS)}}} [options]   (vlm-compress demo --help)", file=sys.stderr)
        raise SystemExit(2)
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo.app import main as demo

        demo(rest)
    elif command == "export-vllm":
        from .integrations.vllm import main as export

        export(rest)
    else:
        from .bench.run import main as bench

        bench(rest)


if __name__ == "__main__":
    main()
