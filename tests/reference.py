"""Tiny PyTorch reference models, built and saved by the tests themselves (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from converters import hf_config
from emola_jax.checkpoint import save_pretrained
from emola_jax.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.models import EmolaForConditionalGeneration

IMAGE_TOKEN = 99
TINY = EmolaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=28, patch_size=14),
    text=TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-6),
    image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, prior_position="off",
)
# initialisation only (no field of ours): large weights, logits of order 1-5, so that a small
# mistake shows above the tolerance
VISION_INIT = dict(projection_dim=16, initializer_factor=5.0)
TEXT_INIT = dict(initializer_range=0.2)


def llava_config(*, text: dict | None = None, vision: dict | None = None, **top) -> LlavaConfig:
    """The tiny LLaVA with some fields changed, given in transformers' names (`text`, `vision`: of
    the sub-configs), as transformers reads them; every field is one our config represents."""
    changed = hf_config.llava_to_hf(TINY)
    changed["text_config"].update(text or {})
    changed["vision_config"].update(vision or {})
    changed.update(top)
    data = hf_config.llava_to_hf(hf_config.llava_from_hf(changed))
    data["text_config"].update(TEXT_INIT)
    data["vision_config"].update(VISION_INIT)
    return hf_config.to_transformers(data)


def build_llava(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights, with norms and biases perturbed so that no weight is a trivial 0 or 1."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def image_seq_length(config: LlavaConfig) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def inputs(config: LlavaConfig, *, batch: int = 2, prefix: int = 3, suffix: int = 5, pad: list[int] | None = None,
           side: str = "left", image_tokens: int | None = None, seed: int = 0):
    """input_ids with the image placeholders expanded, pixel values (NHWC), attention mask."""
    rng = np.random.default_rng(seed)
    n_img = image_tokens if image_tokens is not None else image_seq_length(config)
    pad = pad or [0] * batch
    seq = prefix + n_img + suffix + max(pad)
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        row = np.concatenate([
            rng.integers(3, IMAGE_TOKEN, prefix), np.full(n_img, config.image_token_index),
            rng.integers(3, IMAGE_TOKEN, suffix + max(pad) - pad[b]),
        ])
        start = pad[b] if side == "left" else 0
        ids[b, start:start + len(row)] = row
        mask[b, start:start + len(row)] = 1
    v = config.vision_config
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
    return ids, pixels, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_logits(model, ids, pixels, mask=None, **extra) -> np.ndarray:
    with torch.no_grad():
        kwargs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(mask)
            kwargs["position_ids"] = torch.tensor(position_ids(mask))
        kwargs.update(extra)
        return model(**kwargs).logits.float().numpy()


def save_state(state: dict[str, torch.Tensor], directory: Path, *, shards: int = 1, fmt: str = "safetensors",
               config: dict | None = None) -> Path:
    """Writes tensors as a transformers-style directory: one file, or shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        tensors = {k: state[k].contiguous().clone() for k in group}
        if fmt == "safetensors":
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def rename(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


# --- an official EmoLA run, as its training code writes it -------------------------------------

LLAVA_ORIGINAL = [
    ("model.language_model.", "model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
]


def hf_decoder(llava) -> LlamaForCausalLM:
    """The LLaVA's language model as a standalone `LlamaForCausalLM` (what PEFT wraps in EmoLA)."""
    state = llava.state_dict()
    decoder = LlamaForCausalLM(llava.config.text_config).eval()
    decoder.load_state_dict({
        **{k.replace("model.language_model.", "model."): v for k, v in state.items() if "language_model" in k},
        "lm_head.weight": state["lm_head.weight"],
    })
    return decoder


def _mlp(in_dim, out_dim, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim), torch.nn.GELU(), torch.nn.Linear(out_dim, out_dim))


def randomise_adapters(peft, *, scale: float, seed: int) -> None:
    """Non-zero LoRA factors (PEFT starts B at zero, which would hide a wrong import)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn_like(param))


def official_emola_run(root: Path) -> dict:
    """Writes the four directories of an official EmoLA setup under `root` (base, clip, run and its
    PEFT adapter); returns them with the PyTorch modules that are the truth."""
    config = llava_config()
    llava = build_llava(config, seed=3)
    ours = hf_config.llava_from_hf(config.to_dict())
    state = llava.state_dict()

    # base: original LLaVA-1.5 layout, .bin shards, no vision tower; config with mm_* fields
    base_state = rename({k: v for k, v in state.items() if "vision_tower" not in k}, LLAVA_ORIGINAL)
    # (trained, as LLaVA-1.5 and EmoLA were, on images padded to a square: image_aspect_ratio "pad")
    llava_cfg = hf_config.run_to_hf(ours, "float32", pad_to_square=True)
    save_state(base_state, root / "base", shards=2, fmt="bin", config=llava_cfg)

    # CLIP: the full-CLIPModel layout (vision_model.*), with a text tower key the converter must skip
    clip_state = rename({k: v for k, v in state.items() if "vision_tower" in k},
                            [("model.vision_tower.", "vision_model.")])
    clip_state["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    clip_state["logit_scale"] = torch.tensor(2.6)
    clip_cfg = {"model_type": "clip", "vision_config": hf_config.clip_to_hf(ours.vision)}
    save_state(clip_state, root / "clip", config=clip_cfg)

    # run: a retrained mm_projector, the landmark projector, and a PEFT adapter with non-zero B
    run = root / "run"
    run.mkdir()
    mm = _mlp(32, 48, seed=11)
    prior = _mlp(212, 48, seed=12)
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in mm.state_dict().items()},
               run / "non_lora_trainables.bin")
    torch.save({f"model.landmark_feature_projector.{k}": v for k, v in prior.state_dict().items()},
               run / "landmark_feature_projector.bin")
    (run / "config.json").write_text(json.dumps(hf_config.run_to_hf(ours.replace(prior_position="after"), "float32",
                                                                    pad_to_square=True)))
    peft = get_peft_model(hf_decoder(llava), LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    randomise_adapters(peft, scale=0.3, seed=13)
    peft.save_pretrained(run)
    return dict(root=root, config=config, llava=llava, mm=mm, prior=prior, run=run)


# --- a tiny checkpoint and evaluation set -------------------------------------------------------

WORDS = ("a chat between curious user and an artificial intelligence assistant the gives helpful detailed polite "
         "answers to s questions what emotions are conveyed by this face person looks happy sad angry calm au1 "
         "au2 au4 au12 is active").split()


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + [".", ",", ":", "?", "'", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def write_eval_checkpoint(root: Path) -> tuple[Path, Path]:
    """A tiny random EmoLA checkpoint with a word-level tokenizer, and five records of an emotion
    evaluation set (images of several sizes, `.npy` landmarks) under `root`: `(root, checkpoint)`."""
    tokenizer = _tokenizer(root / "tok")
    config = EmolaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28),
        text=TextConfig(vocab_size=len(tokenizer) + 1, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
        image_token_id=len(tokenizer),
    )
    model = EmolaForConditionalGeneration(config, rngs=nnx.Rngs(7))
    ckpt = save_pretrained(model, root / "ckpt", tokenizer_files=sorted((root / "tok").iterdir()))
    rng = np.random.default_rng(0)
    records = []
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "landmarks").mkdir()
    for i in range(5):
        size = [(40, 30), (28, 28), (50, 64), (33, 45), (60, 60)][i]
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "data" / "images" / f"{i}.png")
        np.save(root / "data" / "landmarks" / f"{i}.npy", rng.random(212).astype(np.float32))
        records.append({
            "id": f"img{i}", "source": "AffectNet", "image": f"images/{i}.png", "landmark": f"landmarks/{i}.npy",
            "conversations": [{"from": "human", "value": "<image>\nWhat emotions are conveyed by this face?"},
                              {"from": "gpt", "value": "The person looks happy."}],
            "label": i % 7, "gpt4": "The person looks happy.",
        })
    (root / "data" / "eval_emotion_anno.json").write_text(json.dumps(records))
    return root, ckpt
