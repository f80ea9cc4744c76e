"""`python run.py demo`: the import, generation and evaluation paths on tiny models, no download.

1. A tiny `LlavaForConditionalGeneration` with random weights is written the way transformers
   saves it, converted into an emola-jax checkpoint, loaded, and checked against PyTorch's logits.
2. A tiny EmoLA (configs/tiny.py) with a tokenizer trained on the spot is saved, and evaluated on a
   handful of drawn faces with FABA-style annotations: KV-cache generation, predictions.jsonl,
   REGE metrics and the report. Its weights are untrained, so the scores are at chance level.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emola_jax.checkpoint import load_pretrained
from emola_jax.config import EmolaConfig
from emola_jax.models import EmolaForConditionalGeneration


def _tiny_llava_hf(directory: Path, seed: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=56, patch_size=14),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, initializer_range=0.1),
        image_token_index=511,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def run(workdir: str | Path, experiment, seed: int = 0) -> dict:
    import torch

    model_config: EmolaConfig = experiment.model

    from converters import convert

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {}

    start = time.perf_counter()
    reference = _tiny_llava_hf(workdir / "llava-hf", seed)
    checkpoint = convert(workdir / "llava-hf", workdir / "checkpoint", overwrite=True, progress=False)
    model, config = load_pretrained(checkpoint)
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[1, 7, 9], np.full(config.image_seq_length, config.image_token_id), rng.integers(3, 500, 8)])
    ids = ids[None].astype(np.int32)
    pixels = rng.standard_normal((1, 56, 56, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, ids, pixels))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits.numpy()
    summary["converted_checkpoint"] = str(checkpoint)
    summary["max_abs_logit_diff_vs_transformers"] = float(np.abs(ours - theirs).max())
    summary["import_and_check_seconds"] = round(time.perf_counter() - start, 2)

    emola = EmolaForConditionalGeneration(model_config, rngs=nnx.Rngs(seed))
    n_image = model_config.image_seq_length
    ids = np.concatenate([[1, 5], np.full(n_image, model_config.image_token_id), [6, 7, 8]])[None].astype(np.int32)
    size = model_config.vision.image_size
    pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    landmarks = rng.random((1, model_config.prior_dim)).astype(np.float32)
    forward = nnx.jit(lambda m, i, p, lm: m(i, p, landmarks=lm))
    logits = forward(emola, ids, pixels, landmarks)
    summary["emola_logits_shape"] = tuple(logits.shape)
    summary["emola_image_side_tokens"] = (
        f"{model_config.num_visual_tokens} visual + prior token {model_config.prior_position}"
    )
    summary["lora_parameters"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(emola, nnx.LoRAParam))))

    from emola_jax.checkpoint import save_pretrained
    from emola_jax.eval.evaluate import evaluate_model
    from emola_jax.generate import GenerationConfig

    tokenizer = _train_tokenizer(workdir / "tokenizer", vocab_size=model_config.text.vocab_size - 1)
    checkpoint = save_pretrained(emola, workdir / "emola-tiny", overwrite=True,
                                 tokenizer_files=sorted((workdir / "tokenizer").iterdir()))
    annotations = _draw_faces(workdir / "faces", size=model_config.vision.image_size, rng=rng)
    shutil.rmtree(workdir / "evaluation", ignore_errors=True)  # the demo's own output: start afresh
    metrics = evaluate_model(
        checkpoint, annotations, "emotion", workdir / "evaluation", batch_size=4, progress=False,
        generation=GenerationConfig(max_new_tokens=24, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id),
    )
    summary["untrained_emotion_rege"] = (
        f"S_re {metrics['s_re']:.1f}  S_ge {metrics['s_ge']:.1f}  S_rege {metrics['s_rege']:.1f} (chance level)"
    )
    summary["evaluation_report"] = str(workdir / "evaluation" / "report.md")
    return summary


EMOTIONS = ("happiness", "sadness", "surprise", "anger", "neutral", "disgust", "fear")
DESCRIPTIONS = {
    0: "The person looks happy, with a broad smile and relaxed eyes.",
    1: "The person looks sad, with the mouth corners pulled down.",
    2: "The person looks surprised, with raised brows and an open mouth.",
    3: "The person looks angry, with lowered brows and a tight mouth.",
}


def _train_tokenizer(directory: Path, vocab_size: int):
    """A byte-level BPE trained on the template and the annotations: enough for the demo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from emola_jax.data.conversation import SYSTEM

    corpus = [SYSTEM, "USER: ASSISTANT:", "What emotions are conveyed by this face?", *DESCRIPTIONS.values()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def _draw_faces(directory: Path, size: int, rng: np.random.Generator) -> Path:
    """Simple faces whose mouth and brows follow the emotion, with FABA-style annotations."""
    import json

    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(8):
        label = i % len(DESCRIPTIONS)
        image = Image.new("RGB", (4 * size, 4 * size), (235, 225, 210))
        draw = ImageDraw.Draw(image)
        s = 4 * size
        draw.ellipse((0.15 * s, 0.1 * s, 0.85 * s, 0.9 * s), fill=(240, 200, 170), outline=(90, 60, 40), width=3)
        for x in (0.35, 0.65):
            draw.ellipse(((x - 0.05) * s, 0.38 * s, (x + 0.05) * s, 0.46 * s), fill=(40, 30, 30))
            tilt = {0: 0.0, 1: 0.03, 2: -0.04, 3: -0.03}[label] * (1 if x < 0.5 else -1)
            draw.line(((x - 0.08) * s, (0.3 + tilt) * s, (x + 0.08) * s, (0.3 - tilt) * s), fill=(60, 40, 30), width=4)
        mouth = (0.35 * s, 0.6 * s, 0.65 * s, 0.75 * s)
        if label == 0:
            draw.arc(mouth, 20, 160, fill=(150, 40, 40), width=5)
        elif label == 1:
            frown = (mouth[0], mouth[1] + 0.08 * s, mouth[2], mouth[3] + 0.08 * s)
            draw.arc(frown, 200, 340, fill=(150, 40, 40), width=5)
        elif label == 2:
            draw.ellipse((0.44 * s, 0.6 * s, 0.56 * s, 0.76 * s), fill=(120, 30, 30))
        else:
            draw.line((0.38 * s, 0.68 * s, 0.62 * s, 0.68 * s), fill=(150, 40, 40), width=5)
        image.save(directory / f"face_{i}.png")
        np.save(directory / f"face_{i}.npy", rng.random(212).astype(np.float32))
        records.append({
            "id": f"face_{i}", "image": f"face_{i}.png", "landmark": f"face_{i}.npy", "label": label,
            "conversations": [{"from": "human", "value": "<image>\nWhat emotions are conveyed by this face?"},
                              {"from": "gpt", "value": DESCRIPTIONS[label]}],
            "gpt4": DESCRIPTIONS[label],
        })
    (directory / "eval_emotion_anno.json").write_text(json.dumps(records, indent=1))
    return directory / "eval_emotion_anno.json"
