#!/usr/bin/env python
"""emola-jax command line: parses arguments and hands over to the package."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import traceback
from pathlib import Path

from emola_jax.config import DTYPES


def _convert(args: argparse.Namespace) -> None:
    from converters import convert

    out = convert(args.src, args.out, clip=args.clip, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from converters import export

    out = export(args.ckpt, args.out, fmt=args.format, dtype=args.dtype, merge=not args.no_merge,
                 max_shard_size=args.max_shard_size, adapter_format=args.adapter_format, overwrite=args.overwrite)
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    import configs
    from emola_jax import demo
    from emola_jax.config import override

    experiment = override(configs.load(args.config), args.set)
    summary = demo.run(args.workdir, experiment, seed=args.seed)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def _generation_config(args: argparse.Namespace, tokenizer):
    from emola_jax.data.conversation import pad_token_id
    from emola_jax.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad_token_id(tokenizer), temperature=args.temperature, top_p=args.top_p)


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process run the distributed flags describe (nothing without them)."""
    from emola_jax.distributed import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           peer_timeout=args.peer_timeout)


def _evaluate(args: argparse.Namespace) -> None:
    from emola_jax.atomic import check_apart
    from emola_jax.eval import report

    if (args.predictions is None) == (args.ckpt is None):
        raise ValueError("give either --predictions FILE.jsonl (score a file) or --ckpt CKPT --data SPLIT.json")
    writes = report.REPORT_FILES
    if args.ckpt is not None:
        from emola_jax.eval.evaluate import PREDICTIONS, RUN_SETTINGS

        writes += (PREDICTIONS, RUN_SETTINGS)
    check_apart("--out", args.out, {"--data": args.data, "--predictions": args.predictions, "--ckpt": args.ckpt,
                                    "--landmarks": args.landmarks}, writes=writes)
    if args.predictions is not None:
        if args.coordinator is not None or args.distributed:
            raise ValueError("scoring --predictions runs in one process; the distributed flags go with --ckpt")
        metrics = report.score(report.read_predictions(args.predictions, args.task), args.task, args.protocol)
        report.write_report(args.out, metrics)
    else:
        if args.data is None:
            raise ValueError("--ckpt needs --data, the annotation file of the split to evaluate")
        import jax

        from emola_jax.checkpoint import load_tokenizer
        from emola_jax.eval import evaluate

        _join(args)
        tokenizer = load_tokenizer(args.ckpt)
        metrics = evaluate.evaluate_model(
            args.ckpt, args.data, args.task, args.out, images_root=args.images_root, batch_size=args.batch_size,
            protocol=args.protocol, dtype=args.dtype, generation=_generation_config(args, tokenizer),
            official_prompt=not args.record_prompts, landmarks=args.landmarks,
        )
        if jax.process_index() != 0:  # process 0 reports for every process
            return
    print(f"S_re {metrics['s_re']:.2f}  S_ge {metrics['s_ge']:.2f}  S_rege {metrics['s_rege']:.2f}  "
          f"({args.out / 'report.md'})")


def _generate(args: argparse.Namespace) -> None:
    import jax

    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.data.prior import image_feature
    from emola_jax.eval import evaluate

    if args.landmarks is not None and args.onnx is not None:
        raise ValueError("give --landmarks or --onnx, not both")
    landmarks = image_feature(args.image, npy=args.landmarks, onnx=args.onnx)
    _join(args)
    tokenizer = load_tokenizer(args.ckpt)
    evaluator = evaluate.Evaluator(args.ckpt, dtype=args.dtype, generation=_generation_config(args, tokenizer))
    answer = evaluator.answer(args.image, args.prompt, landmarks)  # every process computes: one program
    if jax.process_index() == 0:
        print(answer)


def _precompute_landmarks(args: argparse.Namespace) -> None:
    from emola_jax.atomic import check_apart
    from emola_jax.data import precompute

    check_apart("--out", args.out, {"--annotations": args.annotations, "--onnx": args.onnx})
    if args.import_npy is not None:
        if args.onnx is not None:
            raise ValueError("give --onnx (run a model) or --import-npy (convert .npy files), not both")
        summary = precompute.import_npy(args.annotations, args.import_npy, args.out, progress=not args.no_progress)
    else:
        if args.onnx is None or args.images_root is None:
            raise ValueError("give --onnx MODEL.onnx and --images-root DIR (or --import-npy LANDMARKS_ROOT)")
        summary = precompute.precompute_landmarks(
            args.annotations, args.images_root, args.onnx, args.out, recipe=args.recipe,
            batch_size=args.batch_size, threads=args.threads, progress=not args.no_progress,
        )
    print(summary.line())


def _train(args: argparse.Namespace) -> None:
    import configs
    from emola_jax.atomic import check_apart
    from emola_jax.config import override
    from emola_jax.train.loop import train

    _join(args)
    assignments = list(args.set)
    if args.steps is not None:
        assignments.append(f"train.steps={args.steps}")
    if args.mesh is not None:
        from emola_jax.sharding import MeshConfig

        mesh = MeshConfig.parse(args.mesh)
        assignments += [f"train.mesh.{axis}={getattr(mesh, axis)}" for axis in ("data", "fsdp", "tensor")]
    experiment = override(configs.load(args.config), assignments)
    check_apart("--workdir", args.workdir, {"train.base": experiment.train.base})
    summary = train(experiment, args.workdir, until=args.until, extend=args.extend)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def _ranged(kind: type, wanted: str, low: float, *, above: bool = False):
    """An argparse type: `kind` read from the option's text and range-checked, so that a wrong
    value is one line naming the option and the value, before any work."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value

    parse.__name__ = wanted  # what argparse would name the type in its own messages
    return parse


positive_int = _ranged(int, "a whole number of at least 1", 1)
non_negative_int = _ranged(int, "a whole number of at least 0", 0)
positive_float = _ranged(float, "a number above 0", 0, above=True)
non_negative_float = _ranged(float, "a number of at least 0", 0)


def shard_size(text: str) -> str:
    """An argparse type for --max-shard-size: kept as given once it reads as a positive size."""
    from converters.writers import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """Says a wrong command line in one line (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help (unless the help says it already, or the option
    is a flag that is off by default), and keeps the epilog's lines as lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default == [] or any(
                action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # never split an option's name

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(" ".join(line.split()), width, initial_indent=indent, subsequent_indent=indent,
                                       break_on_hyphens=False) for line in text.splitlines())


def _command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


DISTRIBUTED_EPILOG = ("multi-process run: give --coordinator, --num-processes and --process-id together (one "
                      "command per process), or --distributed alone; --peer-timeout goes with either.")


def _add_decoding_flags(parser) -> None:
    """Decoding options, range-checked where their rules live (`GenerationConfig`), before any model loads."""
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="longest answer, in tokens; answers cut there are counted in the metrics")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 decodes greedily; the official evaluation samples at 0.01 with top-p 0.5")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process run", "--coordinator, --num-processes and --process-id go "
                                      "together; or --distributed alone (default: one process)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (default: none)")
    group.add_argument("--num-processes", type=positive_int, help="how many processes (default: none)")
    group.add_argument("--process-id", type=non_negative_int, help="this process's index (default: none)")
    group.add_argument("--distributed", action="store_true",
                       help="a TPU pod or cluster that jax detects by itself")
    group.add_argument("--peer-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                       help="a process silent this long is lost, and the others stop, naming it")


def _convert_command(commands) -> None:
    parser = _command(
        commands, "convert",
        help="PyTorch checkpoint -> emola-jax checkpoint",
        description="Convert a llava-hf directory, an original LLaVA-1.5 directory (with --clip), or an official "
        "EmoLA run directory (with --base and --clip) into an emola-jax checkpoint (orbax + config.json). "
        "The format is detected from SRC.",
        epilog="required together: an official EmoLA run needs --base and --clip; an original LLaVA-1.5 "
        "directory needs --clip; a llava-hf directory needs neither.",
    )
    parser.add_argument("src", type=Path, help="the PyTorch checkpoint directory")
    parser.add_argument("out", type=Path, help="where the emola-jax checkpoint is written")
    parser.add_argument("--clip", type=Path, help="CLIP directory (openai/clip-vit-large-patch14-336 layout) for "
                        "checkpoints that do not carry their vision tower (default: none)")
    parser.add_argument("--base", type=Path, help="base LLaVA-1.5 directory of an EmoLA run (default: none)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="dtype the weights are stored in (LoRA factors stay float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.set_defaults(func=_convert)


def _export_command(commands) -> None:
    parser = _command(
        commands, "export",
        help="emola-jax checkpoint -> PyTorch (transformers, PEFT or the official EmoLA layout)",
        description="Write an emola-jax checkpoint as hf: a transformers LlavaForConditionalGeneration directory "
        "(LoRA merged; the prior projector beside it as prior_projector.safetensors), peft: a PEFT LoRA adapter for "
        "that model, or emola: an official EmoLA run (PEFT adapter, non_lora_trainables.bin, "
        "landmark_feature_projector.bin, config.json) to load over its base LLaVA-1.5. Streams one layer at a time.",
        epilog="go together: --max-shard-size and --no-merge with --format hf; --adapter-format with --format peft "
        "or emola.",
    )
    parser.add_argument("ckpt", type=Path, help="the emola-jax checkpoint")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--format", required=True, choices=["hf", "peft", "emola"], help="what to write (required)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="dtype of the written weights (default: the checkpoint's; LoRA factors stay float32)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB",
                        help="hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--no-merge", action="store_true",
                        help="hf: write the base weights without the LoRA update (the base of a --format peft export)")
    parser.add_argument("--adapter-format", default="safetensors", choices=["safetensors", "bin"],
                        help="peft/emola: adapter_model.safetensors or adapter_model.bin (as PEFT 0.4, "
                        "which the official EmoLA code pins, saved it)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.set_defaults(func=_export)


def _demo_command(commands) -> None:
    parser = _command(
        commands, "demo",
        help="run the embedded end-to-end example (no download, a few minutes on a laptop CPU)",
        description="Build a tiny EmoLA base (a random transformers LLaVA with a tokenizer trained on the spot, "
        "converted and checked against PyTorch), draw faces whose expressions follow FABA-style emotion and AU "
        "annotations, precompute their landmark features with a small ONNX graph, train LoRA + the prior projector, "
        "evaluate REGE on held-out faces, export to transformers and PEFT and check the reloaded logits.",
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo_out"), help="where the demo writes its files")
    parser.add_argument("--config", default="tiny", help="config name in configs/ or a path; its "
                        "model and train sections are used, the base and data are the demo's own")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.text.num_hidden_layers=4 (repeatable; "
                        "default: none)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.set_defaults(func=_demo)


def _evaluate_command(commands) -> None:
    parser = _command(
        commands, "evaluate",
        help="score predictions on FABA-Bench (REGE) or a traditional dataset",
        description="Generate answers for a split with a checkpoint, sharded over every device of every process "
        "(each runs the same command with its --process-id), into OUT/predictions.jsonl (a rerun continues where "
        "a killed one stopped), or score an existing predictions "
        "file (JSON lines with prediction, reference, label); then write OUT/metrics.json and OUT/report.md.",
        epilog="required: --task, --out, and either --predictions FILE (score it) or --ckpt CKPT together with "
        "--data SPLIT.json (generate, then score).\n"
        "--images-root, --landmarks, --record-prompts, --batch-size, the decoding options and the multi-process "
        "options go with --ckpt.\n" + DISTRIBUTED_EPILOG,
    )
    parser.add_argument("--task", required=True, choices=["emotion", "au", "rafdb", "bp4d", "disfa", "gft"],
                        help="emotion/rafdb: 7-class accuracy; au/bp4d/disfa/gft: mean F1 over that AU set (required)")
    parser.add_argument("--protocol", default="official", choices=["official", "rouge-score"],
                        help="official: the EmoLA evaluation to the digit; rouge-score: Google's ROUGE-L and a "
                        "whole-word negation test")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and report.md (required)")
    scoring = parser.add_argument_group("score a predictions file", "give --predictions alone")
    scoring.add_argument("--predictions", type=Path,
                         help="JSON-lines file with prediction, reference and label (default: none)")
    generating = parser.add_argument_group("generate with a checkpoint", "--ckpt and --data go together")
    generating.add_argument("--ckpt", type=Path, help="emola-jax checkpoint to generate the predictions with "
                            "(default: none)")
    generating.add_argument("--data", type=Path, help="annotation file of the split (e.g. eval_emotion_anno.json; "
                            "default: none)")
    generating.add_argument("--images-root", type=Path,
                            help="folder the records' image and landmark paths are relative to (default: --data's)")
    generating.add_argument("--landmarks", type=Path, metavar="FEATURES.array_record",
                            help="prior features by record id (precompute-landmarks); default: each record's .npy")
    generating.add_argument("--record-prompts", action="store_true",
                            help="ask each record's own question instead of the official per-task prompt")
    generating.add_argument("--batch-size", type=positive_int, default=8,
                            help="global batch, rounded up to a multiple of the device count")
    _add_decoding_flags(generating)
    _add_distributed_flags(parser)
    parser.set_defaults(func=_evaluate)


def _precompute_landmarks_command(commands) -> None:
    parser = _command(
        commands, "precompute-landmarks",
        help="prior features of every annotated image (ONNX landmark model) -> one ArrayRecord file",
        description="Run a landmark model with 2d106det's signature over every distinct record id of the annotation "
        "files (batched onnxruntime, images decoded by a thread pool) and write the 212-value features, keyed by id, "
        "to OUT. A rerun skips ids already written; unreadable images are listed in OUT's .errors.jsonl and skipped.",
        epilog="required: --annotations, --out, and either --onnx together with --images-root (run a model) or "
        "--import-npy (convert .npy files), not both. --recipe, --batch-size and --threads go with --onnx.",
    )
    parser.add_argument("--annotations", type=Path, nargs="+", required=True,
                        help="annotation JSON file(s) (records with id, image, and landmark for --import-npy; "
                        "required)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the ArrayRecord file to write (FEATURES.array_record; required)")
    model = parser.add_argument_group("run a landmark model", "--onnx and --images-root go together")
    model.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx or any graph with its signature; "
                       "default: none)")
    model.add_argument("--images-root", type=Path, help="folder the records' image paths are relative to "
                       "(default: none)")
    model.add_argument("--recipe", default="official", choices=["official", "insightface"],
                       help="official: EmoLA's (BGR, whole image at 192x192, /255, raw output); "
                       "insightface: the library's Landmark (RGB crop around the box, points in image pixels)")
    model.add_argument("--batch-size", type=positive_int, default=32, help="images per session call")
    model.add_argument("--threads", type=positive_int,
                       help="image decoding threads (default: the core count, at most 8)")
    imported = parser.add_argument_group("convert official .npy files", "give --import-npy instead of --onnx")
    imported.add_argument("--import-npy", type=Path, metavar="LANDMARKS_ROOT",
                          help="an official landmarks/*.npy tree (records' landmark paths) to convert (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_precompute_landmarks)


def _train_command(commands) -> None:
    parser = _command(
        commands, "train",
        help="train LoRA + prior projector over a frozen base checkpoint (resumes by itself)",
        description="Train what the config's train.trainable patterns name (LoRA factors, the prior projector, the "
        "multi-modal projector at its own rate) on the config's data, sharded over a data x fsdp x tensor mesh of "
        "every device of every process. Resumes from the latest checkpoint in WORKDIR; writes "
        "WORKDIR/experiment.json (the run's settings), WORKDIR/metrics.jsonl, TensorBoard logs in "
        "WORKDIR/tensorboard, checkpoints in WORKDIR/checkpoints and, at the end, the trained model in WORKDIR/model.",
        epilog="required: --config and --workdir.\n"
        "A rerun in a WORKDIR that holds checkpoints must give the run's settings (WORKDIR/experiment.json): a change "
        "that alters the run's trajectory is refused, each difference named. It may change the logging and "
        "checkpoint cadence, train.keep_checkpoints, train.remat, train.attention, train.mesh, train.on_nonfinite and "
        "paths to the same files; with --extend it may raise --steps (train.steps), never below the latest "
        "checkpoint.\n" + DISTRIBUTED_EPILOG,
    )
    parser.add_argument("--config", required=True,
                        help="config name in configs/ (tiny, emola_7b, llava15_7b) or a path (required)")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="run folder (created; resumed when it holds one; required)")
    parser.add_argument("--steps", type=positive_int,
                        help="optimiser steps of the whole run (train.steps; default: the config's)")
    parser.add_argument("--extend", action="store_true",
                        help="allow raising train.steps of the run in WORKDIR (the remaining steps follow the "
                        "longer run's learning-rate schedule)")
    parser.add_argument("--until", type=positive_int, metavar="STEP",
                        help="stop after this step (and its checkpoint), as a preemption would; rerun to go on "
                        "(default: train.steps)")
    parser.add_argument("--mesh", help="mesh axis sizes, e.g. data=8,fsdp=1,tensor=1 (one may be -1: the rest; "
                        "default: the config's train.mesh)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.remat=dots (repeatable; default: none)")
    _add_distributed_flags(parser)
    parser.set_defaults(func=_train)


def _generate_command(commands) -> None:
    parser = _command(
        commands, "generate", help="answer one prompt about one image",
        description="Print the model's answer about IMAGE (on several processes, every one computes it and "
        "process 0 prints it).",
        epilog="required: CKPT, --image and --prompt. A model with a prior token needs --landmarks or --onnx, "
        "not both.\n" + DISTRIBUTED_EPILOG,
    )
    parser.add_argument("ckpt", type=Path, help="emola-jax checkpoint (with its tokenizer)")
    parser.add_argument("--image", type=Path, required=True, help="the face image (required)")
    parser.add_argument("--prompt", required=True, help='e.g. "What emotions are conveyed by this face?" (required)')
    prior = parser.add_argument_group("prior feature", "--landmarks or --onnx, not both")
    prior.add_argument("--landmarks", type=Path, help="the image's 212-value prior feature (.npy; default: none)")
    prior.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx) to compute the prior feature "
                       "on the fly with the official recipe (default: none)")
    _add_decoding_flags(parser.add_argument_group("decoding"))
    _add_distributed_flags(parser)
    parser.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _convert_command(commands)
    _export_command(commands)
    _demo_command(commands)
    _evaluate_command(commands)
    _precompute_landmarks_command(commands)
    _train_command(commands)
    _generate_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from emola_jax import distributed

    try:
        args.func(args)
    except BaseException as err:
        if distributed.is_multiprocess():  # the others learn why; jax's shutdown would wait for them
            if args.debug:
                traceback.print_exc()
            distributed.leave_after_error(err)
        if args.debug or not isinstance(err, Exception):
            raise
        print(f"error: {err}", file=sys.stderr)  # one clear sentence unless --debug
        return 1
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
