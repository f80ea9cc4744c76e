#!/usr/bin/env python
"""emola-jax command line: parses arguments and hands over to the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _convert(args: argparse.Namespace) -> None:
    from converters import convert

    out = convert(args.src, args.out, clip=args.clip, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    import configs
    from emola_jax import demo
    from emola_jax.config import override

    config = override(configs.load(args.config), args.set)
    summary = demo.run(args.workdir, config, seed=args.seed)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def _evaluate(args: argparse.Namespace) -> None:
    from emola_jax.eval import report

    if args.predictions is None:
        raise ValueError("give --predictions FILE.jsonl to score an existing predictions file")
    metrics = report.score(report.read_predictions(args.predictions), args.task, args.protocol)
    path = report.write_report(args.out, metrics)
    print(f"S_re {metrics['s_re']:.2f}  S_ge {metrics['s_ge']:.2f}  S_rege {metrics['s_rege']:.2f}  ({path})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="PyTorch checkpoint -> emola-jax checkpoint",
        description="Convert a llava-hf directory, an original LLaVA-1.5 directory (with --clip), or an official "
        "EmoLA run directory (with --base and --clip) into an emola-jax checkpoint (orbax + config.json). "
        "The format is detected from SRC.",
    )
    convert.add_argument("src", type=Path, help="the PyTorch checkpoint directory")
    convert.add_argument("out", type=Path, help="where the emola-jax checkpoint is written")
    convert.add_argument("--clip", type=Path, help="CLIP directory (openai/clip-vit-large-patch14-336 layout) for "
                         "checkpoints that do not carry their vision tower")
    convert.add_argument("--base", type=Path, help="base LLaVA-1.5 directory of an EmoLA run")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="dtype the weights are stored in (LoRA factors stay float32)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    convert.set_defaults(func=_convert)

    demo = commands.add_parser(
        "demo",
        help="run the embedded end-to-end example (no download)",
        description="Convert a tiny random transformers LLaVA, check its logits against PyTorch, and run a tiny "
        "EmoLA with its facial prior token.",
    )
    demo.add_argument("--workdir", type=Path, default=Path("demo_out"), help="where the demo writes its files")
    demo.add_argument("--config", default="tiny", help="config name in configs/ or a path (default: tiny)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set text.num_hidden_layers=4 (repeatable)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)

    evaluate = commands.add_parser(
        "evaluate",
        help="score predictions on FABA-Bench (REGE) or a traditional dataset",
        description="Score a predictions file (JSON lines with prediction, reference, label): writes "
        "OUT/metrics.json and OUT/report.md with its figure.",
    )
    evaluate.add_argument("--predictions", type=Path, help="JSON-lines file with prediction, reference and label")
    evaluate.add_argument("--task", required=True, choices=["emotion", "au", "rafdb", "bp4d", "disfa", "gft"],
                          help="emotion/rafdb: 7-class accuracy; au/bp4d/disfa/gft: mean F1 over that AU set")
    evaluate.add_argument("--protocol", default="official", choices=["official", "rouge-score"],
                          help="official: the EmoLA evaluation to the digit; rouge-score: Google's ROUGE-L and a "
                          "whole-word negation test")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for metrics.json and report.md")
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as err:  # one clear sentence unless --debug
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
