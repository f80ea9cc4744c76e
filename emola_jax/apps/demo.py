"""`python run.py demo`: the whole system on a tiny EmoLA, on a laptop CPU, with no download.

1. A tokenizer is trained on the spot; a tiny random LLaVA-1.5 is saved as transformers saves it,
   converted, and its logits checked against PyTorch's. It is the frozen base of the run.
2. Faces are drawn whose brows, eyes and mouth follow FABA-style emotion and AU annotations
   (training and held-out sets); their prior features (one ArrayRecord file per prior of the
   model) come from a small ONNX graph with 2d106det's signature, or from dlib for the dlib
   priors (`--set 'model.priors=[{"name": "dlib68", "dim": 136}]'`), on the whole drawn face.
3. LoRA, the prior projector and the multi-modal projector are trained on the training faces
   (`run.py train`'s loop, fed by the grain pipeline).
4. The trained model is evaluated on the held-out faces with REGE (emotion and AU).
5. It is exported to transformers and to PEFT, reloaded there, and the logits compared.
The same steps with real weights are in the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoTokenizer, LlavaForConditionalGeneration
from transformers.utils import logging as transformers_logging

from configs.demo_faces import DemoInputs, feature_files, from_base
from converters import convert, export, hf_config
from converters.exporter import prior_file
from emola_jax import atomic
from emola_jax.apps.demo_models import bpe_tokenizer, logits_with_prior, toy_landmark_graph
from emola_jax.checkpoint import load_config, load_pretrained, load_tokenizer
from emola_jax.config import EmolaConfig, PriorToken
from emola_jax.data import conversation, drawn_faces, image, precompute
from emola_jax.data.conversation import SYSTEM
from emola_jax.data.labels import AU_QUESTION, EMOTION_QUESTION, EMOTIONS
from emola_jax.data.priors import PriorFeatures
from emola_jax.eval.evaluate import evaluate_model
from emola_jax.generate import GenerationConfig
from emola_jax.progress import stage_lines
from emola_jax.train.loop import train

PREPARED = "prepared.json"  # written last by `prepare`: what the folder was prepared with


@contextlib.contextmanager
def _without_transformers_bars():
    """transformers' own bars (writing and loading one shard of a tiny model) off: nothing to follow."""
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


def _tiny_llava_hf(directory: Path, config: EmolaConfig, tokenizer_dir: Path, seed: int):
    """A random transformers LLaVA with the shapes of `config`, saved with the tokenizer beside it."""
    data = hf_config.llava_to_hf(config)
    data["text_config"]["initializer_range"] = 0.1
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config.to_transformers(data)).eval()
    with _without_transformers_bars():
        model.save_pretrained(directory)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, directory / file.name)
    return model


def _check_import(reference, checkpoint: Path, rng: np.random.Generator) -> float:
    model, config = load_pretrained(checkpoint)
    ids = np.concatenate([[1, 7, 9], np.full(config.image_seq_length, config.image_token_id), rng.integers(3, 500, 8)])
    ids = ids[None].astype(np.int32)
    size = config.vision.image_size
    pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, ids, pixels))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits.numpy()
    return float(np.abs(ours - theirs).max())


def held_out_inputs(model_dir: Path, eval_file: Path, features: Path | tuple[Path, ...]):
    """The first held-out face of `eval_file` asked the emotion question, as numpy arrays: ids `[1, seq]`
    (image placeholders expanded), pixels `[1, size, size, 3]`, landmarks `[1, prior_dim]`, mask `[1, seq]`."""
    config = load_config(model_dir)
    record = json.loads(eval_file.read_text())[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    ids = conversation.tokenize_with_image(tokenizer, conversation.generation_prompt(EMOTION_QUESTION),
                                           config.image_token_id, config.image_seq_length)[None]
    pixels = image.clip_preprocess(image.load_image(eval_file.parent / record["image"]), config.vision.image_size)[None]
    landmarks = PriorFeatures.open(features, priors=config.priors).get(record["id"])[None]
    return ids.astype(np.int64), pixels, landmarks, np.ones_like(ids)


def _check_exports(model_dir: Path, hf_dir: Path, base_dir: Path, peft_dir: Path, eval_file: Path,
                   features: Path | tuple[Path, ...]) -> tuple[float, float]:
    """Largest logit difference of the transformers export, and of the PEFT adapter (with the prior
    projectors beside it) over `base_dir`, the llava-hf model the run started from, against this
    project's model, on a held-out face with its prior token."""
    model, config = load_pretrained(model_dir)
    ids, pixels, landmarks, mask = held_out_inputs(model_dir, eval_file, features)
    ours = np.asarray(nnx.jit(lambda m, i, p, lm: m(i, p, landmarks=lm))(model, ids.astype(np.int32), pixels,
                                                                          landmarks))
    with _without_transformers_bars():
        hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
        base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    projectors = [hf_dir / prior_file(prior) for prior in config.priors]  # one per prior, in order
    merged = logits_with_prior(hf, projectors, ids, pixels, landmarks, mask)
    with torch.no_grad(), warnings.catch_warnings():
        # peft reads transformers 5's deprecated `is_gradient_checkpointing`: its FutureWarning is the two
        # libraries' business, not the user's
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft = PeftModel.from_pretrained(base, peft_dir)
    adapted = logits_with_prior(peft.eval(), [peft_dir / prior_file(prior) for prior in config.priors], ids,
                                pixels, landmarks, mask)
    return float(np.abs(merged - ours).max()), float(np.abs(adapted - ours).max())


def prepare(workdir: str | Path, config: EmolaConfig, seed: int = 0, *, train_per_emotion: int = 40,
            eval_per_emotion: int = 4, progress: bool = False) -> DemoInputs:
    """Steps 1 and 2: tokenizer, converted base (checked against transformers), faces, features;
    with `progress`, a line per stage and the bars of the long ones (stderr)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    note = stage_lines(progress)
    note("[1/5] base: a tokenizer trained on the spot, a random tiny LlavaForConditionalGeneration saved, "
         "converted, and its logits compared with transformers'")
    _train_tokenizer(workdir / "tokenizer", vocab_size=config.text.vocab_size - 1)
    reference = _tiny_llava_hf(workdir / "llava-hf", config, workdir / "tokenizer", seed)
    base = convert(workdir / "llava-hf", workdir / "base", overwrite=True, progress=progress)
    diff = _check_import(reference, base, np.random.default_rng(seed))
    faces = len(EMOTIONS) * (train_per_emotion + eval_per_emotion)
    note(f"[2/5] faces: {faces} drawn ({len(EMOTIONS) * eval_per_emotion} held out), and their prior features "
         f"({', '.join(p.name for p in config.priors)})")
    files = drawn_faces.write_dataset(workdir / "faces", train_per_emotion=train_per_emotion,
                                      eval_per_emotion=eval_per_emotion, seed=seed, size=4 * config.vision.image_size)
    features = _precompute_priors(workdir, list(files.values()), config.priors, progress)
    atomic.write_text(workdir / PREPARED, json.dumps(_preparation(config, seed, train_per_emotion, eval_per_emotion),
                                                     indent=2) + "\n")  # last: the folder is complete
    return DemoInputs(base=Path(base), faces=workdir / "faces", annotations=files, landmarks=features,
                      import_logit_diff=diff)


def _preparation(config: EmolaConfig, seed: int, train_per_emotion: int, eval_per_emotion: int) -> dict:
    return {"model": dataclasses.asdict(config), "seed": seed, "train_per_emotion": train_per_emotion,
            "eval_per_emotion": eval_per_emotion}


def prepared(workdir: str | Path, config: EmolaConfig, seed: int = 0, *, train_per_emotion: int = 40,
             eval_per_emotion: int = 4) -> DemoInputs | None:
    """The inputs `prepare` finished earlier in `workdir` with these arguments, reused as they are (a
    rebuilt base is another model: runs trained on the first would be refused); None when `workdir`
    holds no finished preparation. ValueError naming each difference when it was prepared otherwise."""
    workdir = Path(workdir).absolute()
    file = workdir / PREPARED
    if not file.is_file():
        return None
    try:
        saved = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is torn ({err}); remove {workdir} to prepare the inputs afresh") from err
    wanted = json.loads(json.dumps(_preparation(config, seed, train_per_emotion, eval_per_emotion)))
    changed = [f"{key}: {saved.get(key)} there, {value} here" for key, value in wanted.items()
               if saved.get(key) != value]
    if changed:
        raise ValueError(f"{workdir} was prepared with other settings ({'; '.join(changed)[:400]}): rerun with "
                         f"those, or use a new workdir (runs trained on those inputs need them)")
    return DemoInputs.in_folder(workdir, config.priors)


def _precompute_priors(workdir: Path, annotations: list[Path], priors: tuple[PriorToken, ...], progress: bool):
    """Every prior's features of the drawn faces (the whole image is the face: dlib's detector may not
    find a drawn one); a face a prior cannot process is an error naming its record."""
    features = feature_files(workdir / "faces", priors)
    for prior, out in zip(priors, (features,) if isinstance(features, Path) else features, strict=True):
        out.unlink(missing_ok=True)
        onnx = toy_landmark_graph(workdir / "landmark_model.onnx", batch="N") if prior.official else None
        summary = precompute.precompute_priors(annotations, workdir / "faces", out, prior=prior.name, onnx=onnx,
                                               progress=progress)
        if summary.failed:
            first = json.loads(summary.errors.read_text().splitlines()[0])
            raise ValueError(f"the {prior.name} prior could not process {summary.failed} drawn face(s), e.g. record "
                             f"{first['id']}: {first['reason']}")
    return features


def run(workdir: str | Path, experiment, seed: int = 0, progress: bool = False) -> dict:
    """Runs the demo in `workdir` (its earlier outputs are replaced); returns the summary. With
    `progress`, each stage says what it does on stderr, and the long ones show their bars."""
    workdir = Path(workdir).absolute()
    for stale in ("run", "evaluation", "export"):
        shutil.rmtree(workdir / stale, ignore_errors=True)
    summary: dict = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary[f"seconds_{name}"] = round(now - clock, 1)
        clock = now

    # 1-2. tokenizer, base model and import check; faces and their prior features
    note = stage_lines(progress)
    inputs = prepare(workdir, experiment.model, seed, progress=progress)
    files, features = inputs.annotations, inputs.landmarks
    summary["base_checkpoint"] = str(inputs.base)
    summary["max_abs_logit_diff_vs_transformers"] = inputs.import_logit_diff
    summary["faces"] = f"{inputs.faces} ({len(json.loads(files['train_emotion'].read_text()))} training, " \
                       f"{len(json.loads(files['eval_emotion'].read_text()))} held-out)"
    lap("data")

    # 3. training
    experiment = from_base(experiment, inputs, seed)
    note(f"[3/5] training: {experiment.train.steps} steps of LoRA, the prior projector and the multi-modal "
         "projector")
    result = train(experiment, workdir / "run", progress=progress)
    summary["train_loss"] = f"{result['first_loss']:.3f} (step 1) -> {result['last_loss']:.3f} (step {result['steps']})"
    summary["trained_model"] = result["model"]
    lap("train")

    # 4. evaluation on the held-out faces
    tokenizer = load_tokenizer(inputs.base)
    generation = GenerationConfig(max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    for task in ("emotion", "au"):
        note(f"[4/5] evaluation: the {'emotion' if task == 'emotion' else 'AU'} question on the held-out faces")
        metrics = evaluate_model(result["model"], files[f"eval_{task}"], task, workdir / "evaluation" / task,
                                 batch_size=14, progress=progress, generation=generation, landmarks=features)
        recognition = f"accuracy {metrics['accuracy']:.1f}%" if task == "emotion" else f"mean F1 {metrics['s_re']:.1f}"
        summary[f"rege_{task}"] = (f"S_re {metrics['s_re']:.1f}  S_ge {metrics['s_ge']:.1f}  "
                                   f"S_rege {metrics['s_rege']:.1f}  ({recognition})")
    summary["evaluation_reports"] = str(workdir / "evaluation" / "{emotion,au}" / "report.md")
    lap("evaluate")

    # 5. export to PyTorch and reload
    note("[5/5] export: to transformers and to PEFT, both reloaded in PyTorch and their logits compared")
    hf_dir = export(result["model"], workdir / "export" / "hf", fmt="hf", progress=progress)
    base_dir = workdir / "llava-hf"  # the transformers model the run's base was converted from
    peft_dir = export(result["model"], workdir / "export" / "peft", fmt="peft", progress=progress)
    merged_diff, peft_diff = _check_exports(Path(result["model"]), hf_dir, base_dir, peft_dir,
                                            files["eval_emotion"], features)
    summary["export_transformers"] = f"{hf_dir} (max |logit diff| {merged_diff:.1e})"
    summary["export_peft"] = f"{peft_dir} over {base_dir} (max |logit diff| {peft_diff:.1e})"
    lap("export")
    return summary


def _train_tokenizer(directory: Path, vocab_size: int):
    """A byte-level BPE trained on the template and the annotations: enough for the demo."""
    answers = [drawn_faces.describe_emotion(e) for e in EMOTIONS]
    answers += [drawn_faces.describe_aus(e) for e in EMOTIONS if drawn_faces.EMOTION_AUS[e]]
    return bpe_tokenizer(directory, [SYSTEM, "USER: ASSISTANT:", EMOTION_QUESTION, AU_QUESTION, *answers], vocab_size)


