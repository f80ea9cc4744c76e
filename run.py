#!/usr/bin/env python
"""emola-jax command line: parses arguments and hands over to the package."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np

import configs
from emola_jax.atomic import atomic_file, check_apart, make_folder
from emola_jax.config import is_official, override
from emola_jax.data import precompute, priors
from emola_jax.data.conversation import pad_token_id
from emola_jax.data.faces import CHIP_PADDING, CHIP_SIZE
from emola_jax.data.image import decode_rgb
from emola_jax.data.priors import PRIORS, image_feature
from emola_jax.eval import report
from emola_jax.settings import (
    AdapterFormat,
    Detector,
    Dtype,
    ExportFormat,
    KeyframeRule,
    Protocol,
    Quantize,
    Recipe,
    Remat,
    Task,
    choices,
)


def _convert(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from converters import convert

    kwargs = dict(clip=args.clip, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    if args.quantize == "none":
        if args.block_size is not None:
            raise ValueError("--block-size goes with --quantize int8 or nf4")
        out = convert(args.src, args.out, **kwargs)
    else:
        # deferred: start-up time (jax)
        from emola_jax.apps.convert import convert_quantized
        from emola_jax.quantization import Quantization

        block_size = 64 if args.block_size is None else args.block_size
        out = convert_quantized(args.src, args.out, Quantization(args.quantize, block_size), **kwargs)
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from converters import export

    out = export(args.ckpt, args.out, fmt=args.format, dtype=args.dtype, merge=not args.no_merge,
                 max_shard_size=args.max_shard_size, adapter_format=args.adapter_format, overwrite=args.overwrite)
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from emola_jax.apps import demo

    experiment = override(configs.load(args.config), args.set)
    summary = demo.run(args.workdir, experiment, seed=args.seed, progress=True)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def _ablation(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from emola_jax.apps import ablation

    experiment = override(configs.load(args.config), args.set)
    eval_sets = None
    if args.eval_emotion or args.eval_au:
        if not (args.eval_emotion and args.eval_au and args.eval_landmarks):
            raise ValueError("give --eval-emotion, --eval-au and --eval-landmarks together (or none: the demo's faces)")
        if experiment.train.base is None:
            raise ValueError(f"config {args.config} is a whole tiny model scored on the demo's faces; the --eval-* "
                             "files go with a config that trains from a real base (train.base), e.g. --config "
                             "emola_7b")
        eval_sets = ablation.EvalSets({"emotion": args.eval_emotion, "au": args.eval_au}, args.eval_images_root,
                                      tuple(args.eval_landmarks))
    elif experiment.train.base is not None:
        raise ValueError(f"config {args.config} trains from {experiment.train.base}: give --eval-emotion, --eval-au "
                         "and --eval-landmarks to score it (the demo's faces go with a whole tiny model)")
    table = ablation.run_table(args.table, args.workdir, experiment, seed=args.seed, eval_sets=eval_sets,
                               max_new_tokens=args.max_new_tokens, progress=True)
    print(table.read_text(), end="")
    print(f"chart: {table.with_suffix('.png')}")


def _generation_config(args: argparse.Namespace, tokenizer):
    # deferred: start-up time (jax)
    from emola_jax.generate import GenerationConfig

    new_tokens = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    return GenerationConfig(max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=pad_token_id(tokenizer), temperature=args.temperature, top_p=args.top_p)


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process run the distributed flags describe (nothing without them); processes
    started with different settings (`_settings`) all stop there, each difference named."""
    # deferred: start-up time (jax)
    from emola_jax.distributed import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           peer_timeout=args.peer_timeout, settings=_settings(args))


def _settings(args: argparse.Namespace) -> dict:
    """The settings every process of a run must share: the command and every option as parsed
    (argv-level; a train config is resolved after the join), named as given (`--steps`, `CKPT`),
    paths as written; --process-id, which differs, left out."""
    names = getattr(args, "setting_names", {})
    settings = {"the command": args.command}
    for dest, value in vars(args).items():
        if dest in ("command", "func", "process_id", "setting_names"):
            continue
        settings[names.get(dest, "--" + dest.replace("_", "-"))] = json.loads(json.dumps(value, default=str))
    return settings


def _evaluate(args: argparse.Namespace) -> None:
    if (args.predictions is None) == (args.ckpt is None):
        raise ValueError("give either --predictions FILE.jsonl (score a file) or --ckpt CKPT --data SPLIT.json")
    writes = report.REPORT_FILES
    if args.ckpt is not None:
        from emola_jax.eval import evaluate  # deferred: start-up time (jax), for the runs that answer

        writes += (evaluate.PREDICTIONS, evaluate.RUN_SETTINGS)
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
        # deferred: start-up time (jax)
        import jax

        from emola_jax.checkpoint import load_tokenizer

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
    # deferred: start-up time (jax)
    import jax

    from emola_jax.checkpoint import load_config, load_tokenizer
    from emola_jax.predictor import Predictor

    if args.prior_npy is not None and args.onnx is not None:
        raise ValueError("give --prior-npy or --onnx, not both")
    config = load_config(args.ckpt)
    priors = config.priors if config.prior_position != "off" else ()
    if args.save_prior is not None:
        if not priors:
            raise ValueError(f"--save-prior: the model at {args.ckpt} has no prior token")
        check_apart("--save-prior", args.save_prior, {"--image": args.image, "CKPT": args.ckpt,
                                                      "--prior-npy": args.prior_npy, "--onnx": args.onnx},
                    writes=[f"{p.name}.npy" for p in priors])
    landmarks = image_feature(args.image, npy=args.prior_npy, onnx=args.onnx, priors=priors) if priors else None
    if priors and landmarks is None:
        raise ValueError(f"the model's priors ({', '.join(p.name for p in priors)}) include 2d106det, which runs a "
                         "landmark model: give --onnx MODEL.onnx, or --prior-npy FILE.npy per prior")
    decode_rgb(args.image)  # a bad image is one line naming it, before any model loads
    _join(args)
    if args.save_prior is not None and landmarks is not None and jax.process_index() == 0:
        _save_prior(args.save_prior, priors, landmarks)
    tokenizer = load_tokenizer(args.ckpt)
    predictor = Predictor(args.ckpt, dtype=args.dtype, generation=_generation_config(args, tokenizer),
                          fit_context=args.max_new_tokens is None, seed=args.seed)
    answer = predictor.answer(args.image, args.prompt, landmarks)  # every process computes: one program
    if jax.process_index() == 0:
        print(answer)


def _save_prior(folder: Path, priors, feature) -> None:
    """`FOLDER/<prior>.npy`, one per prior of the model: what `generate --prior-npy` takes back."""
    make_folder(folder)
    start = 0
    for prior in priors:
        buffer = io.BytesIO()
        np.save(buffer, feature[start:start + prior.dim])
        start += prior.dim
        with atomic_file(folder / f"{prior.name}.npy") as staging:
            staging.write_bytes(buffer.getvalue())


def _analyze(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from emola_jax.apps.analyze import analyze
    from emola_jax.apps.video import VideoSettings
    from emola_jax.checkpoint import load_tokenizer

    video = VideoSettings(every=args.every, keyframes=args.keyframes, peak_window=args.peak_window,
                          peak_ratio=args.peak_ratio, detect_every=args.detect_every, patience=args.patience)
    summary = analyze(args.inputs, args.ckpt, args.out, onnx=args.onnx, detector=args.detector,
                      upsample=args.upsample, min_score=args.min_score, max_faces=args.max_faces,
                      chip_size=args.chip_size, chip_padding=args.chip_padding, batch_size=args.batch_size,
                      threads=args.threads, generation=_generation_config(args, load_tokenizer(args.ckpt)),
                      dtype=args.dtype, progress=not args.no_progress, overwrite=args.overwrite,
                      fit_context=args.max_new_tokens is None, video=video)
    if summary["photos"]:
        print(f"{summary['faces']} faces in {summary['photos'] - summary['skipped']} photos "
              f"({summary['without_face']} without a face, {summary['skipped']} skipped): "
              f"{summary['out']}/index.html")
    for clip in summary["videos"]:
        print(f"{clip['video']}: {clip['frames']} frames ({clip['frames_per_second']} frames/s), {clip['tracks']} "
              f"tracks, {clip['keyframes']} keyframes asked: {clip['out']}/")


def _serve(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax, fastapi)
    import uvicorn

    from emola_jax.apps.serve import Server, create_app
    from emola_jax.checkpoint import load_config
    from emola_jax.data.labels import EMOTION_QUESTION
    from emola_jax.generate import GenerationConfig
    from emola_jax.predictor import ImageInputs, Predictor
    from emola_jax.serving import Engine

    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    new_tokens = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    GenerationConfig(max_new_tokens=new_tokens)  # its range, checked before the model loads
    inputs = ImageInputs(load_config(args.ckpt), args.onnx)  # a missing or unwanted --onnx, said before too
    predictor = Predictor(args.ckpt, dtype=args.dtype)
    engine = Engine(predictor, rows=args.rows, queue_size=args.queue, length=args.cache_length).start()
    engine.warm_up(predictor.prompt_ids(EMOTION_QUESTION))
    name = args.name or args.ckpt.resolve().name
    server = Server(engine, inputs, name=name, max_new_tokens=new_tokens)
    app = create_app(server, api_key=api_key)
    print(f"serving {args.ckpt} as {name!r} on http://{args.host}:{args.port} ({engine.rows} rows, a queue of "
          f"{args.queue}{', API key required' if api_key else ''})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.close()


def _precompute_priors(args: argparse.Namespace) -> None:
    check_apart("--out", args.out, {"--annotations": args.annotations, "--onnx": args.onnx})
    prior = priors.get(args.prior)
    if args.import_npy is not None:
        if args.onnx is not None:
            raise ValueError("give --onnx (run a model) or --import-npy (convert .npy files), not both")
        if not is_official(args.prior):
            raise ValueError(f"--import-npy converts official 2d106det .npy files, not {args.prior} features")
        summary = precompute.import_npy(args.annotations, args.import_npy, args.out, progress=not args.no_progress)
    else:
        if args.images_root is None or (prior.needs_onnx and args.onnx is None):
            raise ValueError(f"give --images-root DIR{' and --onnx MODEL.onnx' if prior.needs_onnx else ''}"
                             f"{' (or --import-npy LANDMARKS_ROOT)' if is_official(args.prior) else ''}")
        summary = precompute.precompute_priors(
            args.annotations, args.images_root, args.out, prior=args.prior, onnx=args.onnx, recipe=args.recipe,
            batch_size=args.batch_size, threads=args.threads, progress=not args.no_progress,
        )
    print(summary.line())


def _train(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from emola_jax.train.loop import train

    _join(args)
    assignments = list(args.set)
    if args.steps is not None:
        assignments.append(f"train.steps={args.steps}")
    assignments += _mesh_assignments(args.mesh)
    experiment = override(configs.load(args.config), assignments)
    check_apart("--workdir", args.workdir, {"train.base": experiment.train.base})
    summary = train(experiment, args.workdir, until=args.until, extend=args.extend)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")


def _mesh_assignments(text: str | None) -> list[str]:
    """`--mesh data=2,fsdp=4` as `--set train.mesh.*` assignments (every axis, ICI and DCN)."""
    if text is None:
        return []

    # deferred: start-up time (jax)
    from emola_jax.sharding import MeshConfig

    mesh = MeshConfig.parse(text)
    return [f"train.mesh.{field.name}={getattr(mesh, field.name)}" for field in dataclasses.fields(mesh)]


def _plan(args: argparse.Namespace) -> None:
    # deferred: start-up time (jax)
    from emola_jax import plan

    assignments = list(args.set)
    assignments += _mesh_assignments(args.mesh)
    for key, value in (("train.remat", args.remat), ("train.base_quantization", args.quantize)):
        if value is not None:
            assignments.append(f"{key}={value}")
    experiment = override(configs.load(args.config), assignments)
    if args.evaluate and args.num_slices > 1:
        raise ValueError("--evaluate plans one slice (evaluation replicates the model on every chip)")
    if not args.evaluate and (args.prompt_length or args.new_tokens):
        raise ValueError("--prompt-length and --new-tokens go with --evaluate (training plans take --seq)")
    plan.run(experiment, args.topology, num_slices=args.num_slices, batch=args.batch, seq=args.seq,
             search=not args.no_search, max_batch=args.max_batch, evaluate=args.evaluate,
             prompt_length=args.prompt_length or 640, max_new_tokens=args.new_tokens or 128,
             device_gib=args.device_gib, log=lambda line: print(line, flush=True))


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
    # deferred: start-up time (jax)
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
    """Marks each required option as such and shows each other option's default after its help
    (unless the help says it already, or the option is a flag that is off by default), and keeps
    the epilog's lines as lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings and "required" not in text:
            return f"{text} (required)"
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
    parser = commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
    # after the command too (`run.py train ... --debug`); unset here, the top level's value stands
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _add_checkpoint(parser, help: str) -> None:
    """The checkpoint as the first positional or as `--ckpt` (which every command that takes a
    checkpoint accepts); `_one_checkpoint` keeps one."""
    parser.add_argument("ckpt", type=Path, nargs="?", metavar="CKPT", help=f"{help}; or --ckpt CKPT")
    parser.add_argument("--ckpt", type=Path, dest="ckpt_option", metavar="CKPT",
                        help="the checkpoint as an option, in place of CKPT (default: none)")


def _one_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`CKPT` and `--ckpt CKPT` as one `args.ckpt`; both at once, or neither where the command needs
    one, is a usage error."""
    if "ckpt_option" not in vars(args):
        return
    given = [path for path in (args.ckpt, vars(args).pop("ckpt_option")) if path is not None]
    if len(given) == 2:
        parser.error(f"{args.command}: give the checkpoint once, as CKPT or as --ckpt CKPT")
    args.ckpt = given[0] if given else None
    if args.ckpt is None and args.command in CHECKPOINT_REQUIRED:
        parser.error(f"{args.command}: the checkpoint is required (CKPT or --ckpt CKPT)")


CHECKPOINT_REQUIRED = ("generate", "export")  # evaluate takes --predictions instead
DEBUG_HELP = "show full tracebacks instead of one-line errors"


DISTRIBUTED_EPILOG = ("multi-process run: give --coordinator, --num-processes and --process-id together (one "
                      "command per process), or --distributed alone; --peer-timeout goes with either.")


DEFAULT_NEW_TOKENS = 512


def _add_decoding_flags(parser, *, scored: bool) -> None:
    """Decoding options, range-checked where their rules live (`GenerationConfig`), before any model loads.
    `scored` (evaluate): the longest answer is a fixed setting of the metrics; elsewhere its default is
    a ceiling lowered to what the model's context leaves after the prompt, as transformers' `generate`
    stops at the model's length."""
    if scored:
        parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS,
                            help="longest answer, in tokens; answers cut there are counted in the metrics")
    else:
        parser.add_argument("--max-new-tokens", type=int, metavar="N",
                            help=f"longest answer, in tokens (default: {DEFAULT_NEW_TOKENS}, or what the model's "
                            "context leaves after the prompt where that is less); more than the context leaves is "
                            "refused")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 decodes greedily; the official evaluation samples at 0.01 with top-p 0.5")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--dtype", default="float32", choices=choices(Dtype), help="compute dtype")


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process run", "--coordinator, --num-processes and --process-id go "
                                      "together; or --distributed alone (default: one process)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (default: none)")
    group.add_argument("--num-processes", type=positive_int, help="how many processes (default: none)")
    group.add_argument("--process-id", type=non_negative_int, help="this process's index (default: none)")
    group.add_argument("--distributed", action="store_true",
                       help="a TPU pod or cluster that jax detects by itself")
    group.add_argument("--peer-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                       help="a process silent this long is lost, and the others stop, naming it; at the start, "
                       "how long the processes wait for each other")
    # how `_settings` names each option when the processes' settings differ (the flag, or a positional's metavar)
    parser.set_defaults(setting_names={action.dest: max(action.option_strings, key=len) if action.option_strings
                                       else (action.metavar or action.dest.upper()) for action in parser._actions})


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
    parser.add_argument("--dtype", default="float32", choices=choices(Dtype),
                        help="dtype the weights are stored in (LoRA factors stay float32)")
    parser.add_argument("--quantize", default="none", choices=choices(Quantize),
                        help="store the decoder's projection kernels quantised (a QLoRA base)")
    parser.add_argument("--block-size", type=non_negative_int,
                        help="with --quantize: inputs per scale (0: one scale per output channel; default: 64)")
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
        epilog="required: CKPT (or --ckpt CKPT), OUT and --format. Go together: --max-shard-size and --no-merge "
        "with --format hf; --adapter-format with --format peft or emola.",
    )
    _add_checkpoint(parser, "the emola-jax checkpoint (required)")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--format", required=True, choices=choices(ExportFormat), help="what to write (required)")
    parser.add_argument("--dtype", choices=choices(Dtype),
                        help="dtype of the written weights (default: the checkpoint's; LoRA factors stay float32)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB",
                        help="hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    parser.add_argument("--no-merge", action="store_true",
                        help="hf: write the base weights without the LoRA update (the base of a --format peft export)")
    parser.add_argument("--adapter-format", default="safetensors", choices=choices(AdapterFormat),
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
    parser.add_argument("--config", default="tiny", help="a config's name (run.py train --help lists them) or a "
                        "path; its "
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
        epilog="required: --task, --out, and either --predictions FILE (score it) or CKPT (or --ckpt CKPT) "
        "together with --data SPLIT.json (generate, then score).\n"
        "--images-root, --landmarks, --record-prompts, --batch-size, the decoding options and the multi-process "
        "options go with --ckpt.\n" + DISTRIBUTED_EPILOG,
    )
    parser.add_argument("--task", required=True, choices=choices(Task),
                        help="emotion/rafdb: 7-class accuracy; au/bp4d/disfa/gft: mean F1 over that AU set (required)")
    parser.add_argument("--protocol", default="official", choices=choices(Protocol),
                        help="official: the EmoLA evaluation to the digit; rouge-score: Google's ROUGE-L and a "
                        "whole-word negation test")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json and report.md (required)")
    scoring = parser.add_argument_group("score a predictions file", "give --predictions alone")
    scoring.add_argument("--predictions", type=Path,
                         help="JSON-lines file with prediction, reference and label (default: none)")
    generating = parser.add_argument_group("generate with a checkpoint", "--ckpt and --data go together")
    _add_checkpoint(generating, "emola-jax checkpoint to generate the predictions with (default: none)")
    generating.add_argument("--data", type=Path, help="annotation file of the split (e.g. eval_emotion_anno.json; "
                            "default: none)")
    generating.add_argument("--images-root", type=Path,
                            help="folder the records' image and landmark paths are relative to (default: --data's)")
    generating.add_argument("--landmarks", type=Path, nargs="+", metavar="FEATURES.array_record",
                            help="prior features by record id (precompute-priors), one file per prior of the model "
                            "in its order; default: each record's .npy")
    generating.add_argument("--record-prompts", action="store_true",
                            help="ask each record's own question instead of the official per-task prompt")
    generating.add_argument("--batch-size", type=positive_int, default=8,
                            help="global batch, rounded up to a multiple of the device count")
    _add_decoding_flags(generating, scored=True)
    _add_distributed_flags(parser)
    parser.set_defaults(func=_evaluate)


def _precompute_landmarks_command(commands) -> None:
    parser = _command(
        commands, "precompute-landmarks",
        help="prior features of every annotated image (ONNX landmark model) -> one ArrayRecord file",
        description="Run a landmark model with 2d106det's signature over every distinct record id of the annotation "
        "files (batched onnxruntime, images decoded by a thread pool) and write the 212-value features, keyed by id, "
        "to OUT. A rerun skips ids already written; unreadable or oversized images and features with NaN or infinite "
        "values are listed in OUT's .errors.jsonl and not stored. The same as precompute-priors --prior 2d106det.",
        epilog="required: --annotations, --out, and either --onnx together with --images-root (run a model) or "
        "--import-npy (convert .npy files), not both. --recipe, --batch-size and --threads go with --onnx.",
    )
    _add_precompute_flags(parser, recipe_default="official")
    parser.set_defaults(func=_precompute_priors, prior="2d106det")


def _precompute_priors_command(commands) -> None:
    parser = _command(
        commands, "precompute-priors",
        help="one face prior's features of every annotated image -> one ArrayRecord file",
        description="Run a registered face prior over every distinct record id of the annotation files (images "
        "decoded by a thread pool, the model called in batches) and write its features, keyed by id, to OUT, whose "
        "footer names the prior and its width. The face is the whole image, or a record's bbox [x1, y1, x2, y2] "
        "for the priors and recipes that take a box. A rerun skips ids already written; unreadable or oversized "
        "images, faces the prior cannot process (a box outside its image) and features with NaN or infinite values "
        "are listed in OUT's .errors.jsonl and not stored. Priors: "
        + "; ".join(f"{p.name} ({p.dim} values): {p.summary}" for p in PRIORS.values()) + ".",
        epilog="required: --prior, --annotations, --out and --images-root; --onnx for 2d106det (or --import-npy "
        "instead of --onnx and --images-root). --recipe goes with 2d106det.",
    )
    parser.add_argument("--prior", required=True, choices=list(PRIORS), help="the face prior (required)")
    _add_precompute_flags(parser, recipe_default=None)
    parser.set_defaults(func=_precompute_priors)


def _add_precompute_flags(parser: argparse.ArgumentParser, recipe_default: str | None) -> None:
    parser.add_argument("--annotations", type=Path, nargs="+", required=True,
                        help="annotation JSON file(s) (records with id, image, and landmark for --import-npy; "
                        "required)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the ArrayRecord file to write (FEATURES.array_record; required)")
    model = parser.add_argument_group("run the prior's model", "--images-root, with --onnx for 2d106det")
    model.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx or any graph with its signature; "
                       "default: none)")
    model.add_argument("--images-root", type=Path, help="folder the records' image paths are relative to "
                       "(default: none)")
    model.add_argument("--recipe", default=recipe_default, choices=choices(Recipe),
                       help="2d106det: official: EmoLA's (BGR, whole image at 192x192, /255, raw output); "
                       "insightface: the library's Landmark (RGB crop around the box, points in image pixels)"
                       + ("" if recipe_default else " (default: official)"))
    model.add_argument("--batch-size", type=positive_int, default=32, help="images per model call")
    model.add_argument("--threads", type=positive_int,
                       help="image decoding threads (default: the core count, at most 8)")
    imported = parser.add_argument_group("convert official .npy files", "give --import-npy instead of --onnx")
    imported.add_argument("--import-npy", type=Path, metavar="LANDMARKS_ROOT",
                          help="an official landmarks/*.npy tree (records' landmark paths) to convert (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
        "configs (--config NAME):\n" + "".join(f"- {name}: {about}\n" for name, about in configs.available().items())
        + "- ablations/TABLE:row=ROW,task=TASK: a row of an ablation table (" + ", ".join(configs.ablation_tables())
        + ")\n- or a path: a Python file with get_config(), or a run's WORKDIR/experiment.json\n"
        "your own data (--set KEY=VALUE): data.annotations (one annotation file, or a JSON list of them), "
        "data.images_root (the folder their image paths are relative to; default: each file's folder), "
        "data.landmarks (the precompute-landmarks/precompute-priors output, FEATURES.array_record, one per prior of "
        "the model; null: each record's official .npy), or data.tfds_dir with data.split (a built tfds dataset); "
        "data.batch_size (global), data.max_length, data.seed; train.base (the converted base checkpoint).\n"
        "A rerun in a WORKDIR that holds checkpoints must give the run's settings (WORKDIR/experiment.json): a change "
        "that alters the run's trajectory is refused, each difference named. It may change the logging and "
        "checkpoint cadence, train.keep_checkpoints, train.remat, train.attention, train.mesh, train.on_nonfinite and "
        "paths to the same files; with --extend it may raise --steps (train.steps), never below the latest "
        "checkpoint.\n" + DISTRIBUTED_EPILOG,
    )
    parser.add_argument("--config", required=True,
                        help="a config's name (listed below) or a path (required)")
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
    parser.add_argument("--mesh", help="mesh axis sizes, e.g. data=8,fsdp=1,tensor=1 (one may be -1: the rest), "
                        "and across TPU slices dcn_data, dcn_fsdp, dcn_tensor (e.g. data=1,fsdp=-1,dcn_data=2; "
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
        epilog="required: CKPT (or --ckpt CKPT), --image and --prompt. A model with a 2d106det prior token needs "
        "--prior-npy or --onnx, not both; dlib priors are computed from the image unless --prior-npy gives them.\n"
        + DISTRIBUTED_EPILOG,
    )
    _add_checkpoint(parser, "emola-jax checkpoint (with its tokenizer; required)")
    parser.add_argument("--image", type=Path, required=True, help="the face image (required)")
    parser.add_argument("--prompt", required=True, help='e.g. "What emotions are conveyed by this face?" (required)')
    prior = parser.add_argument_group("prior feature", "--prior-npy or --onnx, not both")
    prior.add_argument("--prior-npy", type=Path, nargs="+", metavar="FILE.npy", help="the image's prior features, "
                       "one .npy file per prior of the model in its order (2d106det: 212 values; default: none)")
    prior.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx) to compute the 2d106det feature "
                       "on the fly with the official recipe; the dlib priors are computed on the whole image "
                       "without it (default: none)")
    prior.add_argument("--save-prior", type=Path, metavar="FOLDER", help="write the prior feature the answer used "
                       "as FOLDER/<prior>.npy, one per prior of the model, as --prior-npy takes them (default: none)")
    decoding = parser.add_argument_group("decoding")
    _add_decoding_flags(decoding, scored=False)
    decoding.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the sampling (with "
                          "--temperature > 0)")
    _add_distributed_flags(parser)
    parser.set_defaults(func=_generate)


def _ablation_command(commands) -> None:
    parser = _command(
        commands, "ablation",
        help="train and score every row of one of the paper's ablation tables",
        description="Train and score each row of TABLE (tokens: Table 8, tuning: Table 9, tasks: Table 13, "
        "position: Table 14, priors: each face prior alone, and dlib68 beside 2d106det), each task on its own "
        "set as the paper does, and write WORKDIR/table.md (this run's S_re, S_ge, S_rege beside the paper's) and "
        "WORKDIR/table.png. By default on the demo's drawn faces from its tiny base (minutes on a CPU); with a "
        "config that trains from a real base (e.g. --config emola_7b) and the --eval-* files, on FABA-Instruct.",
        epilog="required: TABLE and --workdir. --eval-emotion, --eval-au and --eval-landmarks go together.",
    )
    parser.add_argument("table", choices=configs.ablation_tables(), help="which table")
    parser.add_argument("--workdir", type=Path, required=True, help="where the runs, scores and table go (required)")
    parser.add_argument("--config", default="tiny", help="the full EmoLA experiment the rows change; tiny "
                        "runs on the demo's faces (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=50 (repeatable; default: none)")
    parser.add_argument("--eval-emotion", type=Path,
                        help="FABA-Bench emotion test annotations (real runs; default: the demo's held-out faces)")
    parser.add_argument("--eval-au", type=Path,
                        help="FABA-Bench AU test annotations (real runs; default: the demo's held-out faces)")
    parser.add_argument("--eval-landmarks", type=Path, nargs="+", help="prior features of the test images, one "
                        "file per prior of the table's largest model, in its order (real runs; default: the demo's)")
    parser.add_argument("--eval-images-root", type=Path,
                        help="folder the test annotations' images are relative to (default: each annotation file's "
                        "folder)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.set_defaults(func=_ablation)


def _analyze_command(commands) -> None:
    parser = _command(
        commands, "analyze", help="find, align and describe every face in ordinary photos and videos",
        description="For every face in every PHOTO: its box, its crop aligned as the training images were "
        "(dlib's face chip), its prior feature, the model's answers to the emotion and the AU question, and the "
        "emotion class and AUs the official scoring reads from them. Writes OUT/<photo>.png (faces boxed and "
        "labelled), OUT/faces/ (crops, and each prior's feature as .npy), OUT/results.jsonl and OUT/index.html. A "
        "photo that is unreadable, oversized, or whose face gives a non-finite prior feature is skipped, named in "
        "one line. A VIDEO (a video file, a camera such as /dev/video0, an rtsp:// URL, a pipe) has its faces "
        "tracked through every frame, each face's prior computed on every frame, and the model asked per track at "
        "keyframes: OUT/<video>/frames.csv, tracks.jsonl, annotated.mp4 and a timeline-<track>.png each. Needs the "
        "faces extra (and the video extra for videos): pip install -e '.[faces,video]'.",
        epilog="required: PHOTO or VIDEO..., --ckpt, --out; --onnx for a model with the 2d106det prior.",
    )
    parser.add_argument("inputs", nargs="+", metavar="PHOTO_OR_VIDEO",  # str: a URL keeps its "//"
                        help="image files, and video files or sources (by suffix: .mp4 .mkv .webm .mov ...; "
                        "rtsp:// and other URLs, /dev/video*, pipes)")
    parser.add_argument("--ckpt", type=Path, required=True, help="emola-jax checkpoint (with its tokenizer; "
                        "required)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures, results.jsonl, index.html; "
                        "written whole when every photo is done")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty (once "
                        "the new one is complete)")
    parser.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx) for the prior token, run on each "
                        "aligned face with the official recipe (default: none)")
    faces = parser.add_argument_group("faces")
    faces.add_argument("--detector", choices=choices(Detector), default="hog",
                       help="dlib's HOG detector (fast, frontal faces), dlib's CNN detector (slow on a CPU, finds "
                       "turned and small faces), or insightface's (needs its model pack in ~/.insightface)")
    faces.add_argument("--upsample", type=non_negative_int, default=1,
                       help="times the photo is doubled before detection (finds smaller faces, costs time)")
    faces.add_argument("--min-score", type=non_negative_float, default=0.0,
                       help="drop detections scored below this (0 keeps what dlib's detector keeps)")
    faces.add_argument("--max-faces", type=positive_int, help="the largest N faces of each photo (default: all)")
    faces.add_argument("--chip-size", type=positive_int, default=CHIP_SIZE, help="aligned crop size, pixels")
    faces.add_argument("--chip-padding", type=non_negative_float, default=CHIP_PADDING,
                       help="margin around the face in the crop, as a share of its size (dlib's own value)")
    video = parser.add_argument_group("video")
    video.add_argument("--every", type=positive_float, default=2.0, metavar="SECONDS",
                       help="ask about each tracked face at its first frame and then every SECONDS")
    video.add_argument("--keyframes", choices=choices(KeyframeRule), default="both",
                       help="which frames of a track the model is asked about: every SECONDS, the peak frames "
                       "(where the face's landmarks move furthest from its own median shape), or both")
    video.add_argument("--peak-window", type=positive_float, default=1.0, metavar="SECONDS",
                       help="a peak is the largest displacement within this many seconds either side")
    video.add_argument("--peak-ratio", type=positive_float, default=3.0,
                       help="a peak's displacement is at least this many times the track's median displacement")
    video.add_argument("--detect-every", type=positive_int, default=1, metavar="K",
                       help="detect faces every K frames; dlib's correlation tracker follows them in between")
    video.add_argument("--patience", type=non_negative_float, default=0.5, metavar="SECONDS",
                       help="a track unseen by the detector this long ends")
    run = parser.add_argument_group("throughput")
    run.add_argument("--batch-size", type=positive_int, default=8, help="faces per model call")
    run.add_argument("--threads", type=positive_int, default=4,
                     help="threads decoding photos ahead, and detecting faces in the video frames ahead")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_decoding_flags(parser.add_argument_group("decoding"), scored=False)
    parser.set_defaults(func=_analyze)


API_KEY_VARIABLE = "EMOLA_API_KEY"


def _serve_command(commands) -> None:
    parser = _command(
        commands, "serve", help="answer over HTTP: an OpenAI-compatible API, a per-face endpoint, a web page",
        description="Serve the model at CKPT: POST /v1/chat/completions (OpenAI's schema; one user message with "
        "the question and one image as a data: URL; streaming), GET /v1/models, GET /health, POST /v1/faces (a "
        "photo -> each face's box, answers and readings, as analyze gives them) and GET / (a page to drop a photo "
        "on). One engine batches every request continuously over --rows decoding rows; the answers are those "
        "generate gives for the same image, question and seed.",
        epilog="required: --ckpt; --onnx for a model with the 2d106det prior. /v1/faces needs the faces extra "
        "(dlib).",
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="emola-jax checkpoint (with its tokenizer)")
    parser.add_argument("--onnx", type=Path, help="landmark model (2d106det.onnx) for the prior token, run on each "
                        "image with the official recipe (default: none)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", help=f"require Authorization: Bearer KEY on /v1/ (default: the "
                        f"{API_KEY_VARIABLE} variable, else none)")
    parser.add_argument("--name", help="the model's id in the API (default: CKPT's folder name)")
    parser.add_argument("--rows", type=positive_int, default=8, help="requests decoded at once")
    parser.add_argument("--queue", type=positive_int, default=32,
                        help="requests that may wait for a row; beyond, 429 with Retry-After")
    parser.add_argument("--cache-length", type=positive_int, metavar="TOKENS",
                        help="cache slots per row: the longest prompt plus answer served (default: the model's "
                        "context); every decode step reads all of them, so a shorter cache is a faster step")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"an answer's length when a request gives no max_tokens (default: {DEFAULT_NEW_TOKENS}, "
                        "or what the context leaves after the prompt where that is less)")
    parser.add_argument("--dtype", default="float32", choices=choices(Dtype), help="compute dtype")
    parser.set_defaults(func=_serve)


def _plan_command(commands) -> None:
    parser = _command(
        commands, "plan", help="will a run fit a TPU pod? the real step compiled for a TPU topology, no TPU needed",
        description="Compile the real train step of a config (or with --evaluate the generate step) for a TPU "
        "topology with libtpu's compile-only client, as MaxText's train_compile.py does, and print per chip: "
        "weights, optimiser state, temporaries and the total against the chip's HBM (the compiler refuses a step "
        "that cannot fit), the largest per-chip batch that fits, FLOPs per step, and a roofline time and MFU from "
        "the chip's published peak FLOP/s and HBM bandwidth. It is a compiler plan, not a timing. Needs libtpu: "
        "pip install 'jax[tpu]==<your jax version>' (installs on any machine).",
        epilog="required: --topology. Each compile of a 7B step takes minutes on a small CPU; the batch search "
        "takes about 2 log2(batch) compiles (--no-search skips it).",
    )
    parser.add_argument("--topology", required=True,
                        help="v5e:2x2, v4:2x2x1, v5p:2x2x2 (jax's names), v5e-8, v5p-8, v5e-1 (Cloud's), or cpu "
                        "(this machine's devices; required)")
    parser.add_argument("--num-slices", type=positive_int, default=1,
                        help="slices joined over the data-centre network (set the mesh's dcn_* sizes to match)")
    parser.add_argument("--config", default="emola_7b",
                        help="a config's name (run.py train --help lists them) or a path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.lora.rank=8 (repeatable; default: none)")
    parser.add_argument("--mesh", help="mesh axis sizes, e.g. fsdp=-1 or data=2,fsdp=4,dcn_data=2 (default: the "
                        "config's train.mesh)")
    parser.add_argument("--batch", type=positive_int, default=4, help="rows per chip")
    parser.add_argument("--seq", type=positive_int, default=2048, help="tokens per row (training)")
    parser.add_argument("--remat", choices=choices(Remat),
                        help="train.remat (default: the config's); offload: full, with the layer inputs in host memory")
    parser.add_argument("--quantize", choices=choices(Quantize),
                        help="the frozen base as stored on the chip (train.base_quantization; default: the config's)")
    parser.add_argument("--no-search", action="store_true", help="skip the search for the largest batch")
    parser.add_argument("--max-batch", type=positive_int, default=64, help="largest per-chip batch searched")
    parser.add_argument("--device-gib", type=positive_float,
                        help="memory per device to compare with (default: the chip's HBM; needed for --topology cpu)")
    generating = parser.add_argument_group("evaluation", "--evaluate plans the generate step instead; "
                                            "--prompt-length and --new-tokens go with --evaluate")
    generating.add_argument("--evaluate", action="store_true", help="plan prefill + decode loop, as evaluate runs it")
    generating.add_argument("--prompt-length", type=positive_int,
                            help="prompt tokens: 577 image positions and the question (default: 640)")
    generating.add_argument("--new-tokens", type=positive_int, help="tokens decoded (default: 128)")
    parser.set_defaults(func=_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _convert_command(commands)
    _export_command(commands)
    _demo_command(commands)
    _evaluate_command(commands)
    _precompute_landmarks_command(commands)
    _precompute_priors_command(commands)
    _train_command(commands)
    _generate_command(commands)
    _analyze_command(commands)
    _ablation_command(commands)
    _serve_command(commands)
    _plan_command(commands)
    return parser


def _skip_absent_tpu() -> None:
    """With libtpu installed (the `dev` extra brings it for `plan`), jax starts the TPU runtime on
    every machine, which prints warnings about a missing TPU on one without; there, jax is told
    to use the other platforms. A TPU machine, or a JAX_PLATFORMS set by the user, is left alone."""
    # deferred: start-up time (jax)
    import jax

    try:  # jax's own TPU probe (private; a jax without it leaves the platforms as they are)
        # deferred: start-up time (jax)
        from jax._src import hardware_utils
    except ImportError:
        return
    if "JAX_PLATFORMS" not in os.environ and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        jax.config.update("jax_platforms", "cuda,cpu")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _one_checkpoint(parser, args)
    _skip_absent_tpu()
    # deferred: start-up time (jax)
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
    code = main()
    if code:  # the error is said: skip the interpreter's teardown, where work a failure abandoned (an
        sys.stdout.flush()  # orbax read's coroutines) would print its own tracebacks after the line
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
