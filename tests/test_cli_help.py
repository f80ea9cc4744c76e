"""The command line says what it needs: required options marked, the checkpoint taken the same
way everywhere, `--debug` on either side of the command, every config listed. Parsed in-process:
argparse alone, no model."""

import argparse
from pathlib import Path

import pytest

import configs
import run


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = run.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_required_option_says_so_in_its_help_and_its_epilog():
    for name, parser in _commands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.required and action.option_strings:
                assert "required" in formatter._get_help_string(action), (name, action.option_strings)
                assert max(action.option_strings, key=len) in parser.epilog, (name, action.option_strings)
    # positionals are required by argparse itself; the checkpoint, optional to argparse, is required there
    for name in run.CHECKPOINT_REQUIRED:
        ckpt = next(a for a in _commands()[name]._actions if a.dest == "ckpt")
        assert "required" in ckpt.help and "CKPT (or --ckpt CKPT)" in _commands()[name].epilog


@pytest.mark.parametrize("command,rest", [
    ("generate", ["--image", "face.png", "--prompt", "Why?"]),
    ("export", ["OUT", "--format", "hf"]),
    ("evaluate", ["--data", "split.json", "--task", "emotion", "--out", "results"]),
])
def test_the_checkpoint_is_positional_or_an_option_alike(command, rest, capsys):
    parser = run.build_parser()

    def parse(*argv):
        args = parser.parse_args([command, *argv])
        run._one_checkpoint(parser, args)
        return args

    positional, option = parse("ckpt_dir", *rest), parse("--ckpt", "ckpt_dir", *rest)
    assert positional.ckpt == option.ckpt == Path("ckpt_dir")
    assert vars(positional) == vars(option)  # the same settings, as the processes of a run compare them
    with pytest.raises(SystemExit):
        parse("--ckpt", "other", "ckpt_dir", *rest)
    assert f"{command}: give the checkpoint once, as CKPT or as --ckpt CKPT" in capsys.readouterr().err
    if command in run.CHECKPOINT_REQUIRED:
        with pytest.raises(SystemExit):
            parse(*rest)
        assert f"{command}: the checkpoint is required (CKPT or --ckpt CKPT)" in capsys.readouterr().err
    else:
        assert parse(*rest).ckpt is None  # evaluate scores --predictions without one


def test_debug_goes_before_or_after_the_command():
    parser = run.build_parser()
    for argv in (["--debug", "train", "--config", "tiny", "--workdir", "w"],
                 ["train", "--config", "tiny", "--workdir", "w", "--debug"]):
        assert parser.parse_args(argv).debug is True
    assert parser.parse_args(["train", "--config", "tiny", "--workdir", "w"]).debug is False


def test_train_help_lists_every_config_and_the_data_keys(capsys):
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = sorted(p.stem for p in configs.CONFIG_DIR.glob("*.py") if p.stem != "__init__")
    assert "demo_faces" in names and "emola_13b" in names
    for name in names:
        assert f"- {name}: " in text, name
    for table in configs.ablation_tables():
        assert table in text
    for key in ("data.annotations", "data.images_root", "data.landmarks", "data.tfds_dir", "train.base"):
        assert key in text, key


def test_prior_files_are_named_by_what_they_hold(capsys):
    """`generate` takes .npy files (--prior-npy); `evaluate` ArrayRecord stores (--landmarks, as
    the config's data.landmarks)."""
    parser = run.build_parser()
    args = parser.parse_args(["generate", "ckpt", "--image", "f.png", "--prompt", "p", "--prior-npy", "a.npy"])
    assert args.prior_npy == [Path("a.npy")]
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "ckpt", "--image", "f.png", "--prompt", "p", "--landmarks", "a.npy"])
    capsys.readouterr()
    evaluate = next(a for a in _commands()["evaluate"]._actions if a.dest == "landmarks")
    assert evaluate.metavar == "FEATURES.array_record"
