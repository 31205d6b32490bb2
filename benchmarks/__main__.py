"""``python -m benchmarks run|compare|plot|images|schema``: the suite without the engine CLI."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.errors import EngineError, no_room_message
from engine.fileio import user_path


def build_parser() -> argparse.ArgumentParser:
    from benchmarks import compare, suite

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Benchmark suite of the batch engine.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run the benchmark (engine vs PyTorch reference)")
    suite.add_arguments(p)
    p = sub.add_parser("compare", help="compare a results file with a baseline; fail on a regression")
    compare.add_arguments(p)
    p = sub.add_parser("plot", help="draw the plot of an existing results file")
    p.add_argument("results", type=user_path)
    p.add_argument("--out", type=user_path, help="PNG to write (default: next to the results)")
    p = sub.add_parser("images", help="write the generated image set (e.g. to calibrate INT8 on it)")
    p.add_argument("--out", type=user_path, required=True, help="folder to write (reused when it already holds the set)")
    p.add_argument("--frames", type=int, default=32, metavar="N", help="full frames to generate (default 32)")
    p.add_argument("--crops", type=int, default=32, metavar="N", help="small head crops to generate (default 32)")
    p.add_argument("--frame-size", type=suite._frame_size, default=(1920, 1080), metavar="WxH",
                   help="size of the frames (default 1920x1080)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    sub.add_parser("schema", help="print the JSON Schema of the results file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "run":
            from benchmarks.suite import main as run_main

            return run_main(args)
        if args.command == "compare":
            from benchmarks.compare import main as compare_main

            return compare_main(args)
        if args.command == "plot":
            from benchmarks.plot import plot_results
            from benchmarks.suite import load_results

            out = plot_results(load_results(args.results), args.out or args.results.with_suffix(".png"))
            print(f"wrote {out}")
            return 0
        if args.command == "images":
            from benchmarks.images import ImageSetSpec, generate_image_set

            images = generate_image_set(args.out, ImageSetSpec(args.frames, args.crops, tuple(args.frame_size), args.seed))
            print(f"{len(images)} images in {images.root}")
            return 0
        from benchmarks.schema import RESULT_SCHEMA

        print(json.dumps(RESULT_SCHEMA, indent=2))
        return 0
    except EngineError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `python -m benchmarks compare ... | head`: the reader left
        from engine.cli import stdout_gone

        return stdout_gone()
    except OSError as exc:  # a full disk: one line, as the engine CLI says it
        message = no_room_message(exc)
        if message is None:
            raise
        print(f"benchmarks: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
