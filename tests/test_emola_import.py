"""An official EmoLA run (LLaVA-1.5 base + CLIP + non_lora_trainables + PEFT LoRA + landmark
projector) converts to a model whose logits match PyTorch computing the same thing: projected CLIP
features and the prior token spliced into the embeddings, fed to the PEFT-wrapped HF decoder."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

import emola_jax
from converters import convert, hf_config
from emola_jax.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.models import EmolaForConditionalGeneration
from tests import reference as ref

LLAVA_ORIGINAL = [
    ("model.language_model.", "model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
]


def _hf_decoder(llava) -> LlamaForCausalLM:
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


def _randomise_adapters(peft, *, scale: float, seed: int) -> None:
    """Non-zero LoRA factors (PEFT starts B at zero, which would hide a wrong import)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(scale * torch.randn_like(param))


@pytest.fixture(scope="module")
def emola_run(tmp_path_factory):
    """Writes the four directories of an official EmoLA setup; returns them with the torch truth."""
    root = tmp_path_factory.mktemp("emola")
    config = ref.llava_config()
    llava = ref.build_llava(config, seed=3)
    ours = hf_config.llava_from_hf(config.to_dict())
    state = llava.state_dict()

    # base: original LLaVA-1.5 layout, .bin shards, no vision tower; config with mm_* fields
    base_state = ref.rename({k: v for k, v in state.items() if "vision_tower" not in k}, LLAVA_ORIGINAL)
    # (trained, as LLaVA-1.5 and EmoLA were, on images padded to a square: image_aspect_ratio "pad")
    llava_cfg = hf_config.run_to_hf(ours, "float32", pad_to_square=True)
    ref.save_state(base_state, root / "base", shards=2, fmt="bin", config=llava_cfg)

    # CLIP: the full-CLIPModel layout (vision_model.*), with a text tower key the converter must skip
    clip_state = ref.rename({k: v for k, v in state.items() if "vision_tower" in k},
                            [("model.vision_tower.", "vision_model.")])
    clip_state["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 4)
    clip_state["logit_scale"] = torch.tensor(2.6)
    clip_cfg = {"model_type": "clip", "vision_config": hf_config.clip_to_hf(ours.vision)}
    ref.save_state(clip_state, root / "clip", config=clip_cfg)

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
    peft = get_peft_model(_hf_decoder(llava), LoraConfig(
        r=4, lora_alpha=12, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    _randomise_adapters(peft, scale=0.3, seed=13)
    peft.save_pretrained(run)
    return dict(root=root, config=config, llava=llava, mm=mm, prior=prior, run=run)


# Adapters of 0.3 * randn at scale 3 add as much as the base weights do, and float32 rounding grows
# with them: measured 1.5e-4 at logits up to 5.9 (2.5e-5 of the largest) with jax 0.10.2, torch
# 2.13 and transformers 5.24; the plain-LLaVA parity tests hold 1e-4.
EMOLA_RUN_TOL = 3e-4


def _torch_reference(setup, ids, pixels, landmarks, mask):
    """The EmoLA forward in PyTorch: HF CLIP + retrained projector + prior token, PEFT decoder."""
    llava = setup["llava"]
    decoder = PeftModel.from_pretrained(_hf_decoder(llava), setup["run"]).eval()
    with torch.no_grad():
        vision = llava.model.vision_tower(torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        visual = setup["mm"](vision.hidden_states[-2][:, 1:])
        prior = setup["prior"](torch.tensor(landmarks))[:, None]
        image_side = torch.cat([visual, prior], dim=1)
        ids_t = torch.tensor(ids)
        is_image = ids_t == ref.IMAGE_TOKEN
        embeds = decoder.get_input_embeddings()(torch.where(is_image, 0, ids_t))
        embeds[is_image] = image_side.reshape(-1, image_side.shape[-1])
        return decoder(inputs_embeds=embeds, attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(ref.position_ids(mask))).logits.numpy()


def test_emola_run_matches_pytorch(emola_run, tmp_path):
    out = convert(emola_run["run"], tmp_path / "jax", base=emola_run["root"] / "base",
                  clip=emola_run["root"] / "clip", progress=False)
    model, config = emola_jax.load_pretrained(out)
    assert config.prior_position == "after" and config.image_seq_length == 4 + 1
    assert config.lora.rank == 4 and config.lora.scale == 3.0
    assert config.image_token_id == -200  # LLaVA's own placeholder id, outside the vocabulary
    ids, pixels, mask = ref.inputs(emola_run["config"], batch=2, pad=[0, 2], image_tokens=5)
    ids = np.where(ids == ref.IMAGE_TOKEN, -200, ids)
    landmarks = np.random.default_rng(1).random((2, 212)).astype(np.float32)
    got = np.asarray(model(ids, pixels, attention_mask=mask, landmarks=landmarks))
    expected = _torch_reference(emola_run, np.where(ids == -200, ref.IMAGE_TOKEN, ids), pixels, landmarks, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=EMOLA_RUN_TOL, rtol=0)


def test_lora_factors_stay_separate_from_base(emola_run, tmp_path):
    out = convert(emola_run["run"], tmp_path / "jax", base=emola_run["root"] / "base",
                  clip=emola_run["root"] / "clip", progress=False)
    model, _ = emola_jax.load_pretrained(out)
    q = model.language_model.layers.self_attn.q_proj
    base_q = emola_run["llava"].state_dict()["model.language_model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(q.kernel.get_value()[1]), base_q.T)  # base kernel, unmerged
    adapter = PeftModel.from_pretrained(LlamaForCausalLM(emola_run["config"].text_config), emola_run["run"])
    lora_b = dict(adapter.named_parameters())[
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"].detach().numpy()
    np.testing.assert_array_equal(np.asarray(q.lora_b.get_value()[1]), lora_b.T)
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert len(nnx.to_flat_state(lora_state)) == 14  # A and B for 7 projections, stacked over layers


def test_clip_of_another_resolution_is_refused(emola_run, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(emola_run["root"] / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(ValueError, match="336 px.*28 px"):
        convert(base, tmp_path / "jax", clip=emola_run["root"] / "clip", progress=False)


def test_missing_base_is_a_clear_error(emola_run, tmp_path):
    with pytest.raises(ValueError, match="--base"):
        convert(emola_run["run"], tmp_path / "jax", progress=False)
    assert not (tmp_path / "jax").exists()


@pytest.mark.parametrize("position", ["after", "before"])
def test_prior_token_position(position):
    config = EmolaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28),
        text=TextConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2),
        image_token_id=49, prior_position=position,
    )
    model = EmolaForConditionalGeneration(config, rngs=nnx.Rngs(0))
    pixels = np.random.default_rng(0).standard_normal((1, 28, 28, 3)).astype(np.float32)
    landmarks = np.random.default_rng(1).random((1, 212)).astype(np.float32)
    ids = np.array([[1, 2] + [49] * 5 + [3]])
    embeds = np.asarray(model.embed(ids, pixels, landmarks))
    visual = np.asarray(model.image_features(pixels))[0]
    prior = np.asarray(model.prior_projector(jnp.asarray(landmarks)))[0]
    image_rows = embeds[0, 2:7]
    expected = np.concatenate([visual, prior[None]]) if position == "after" else np.concatenate([prior[None], visual])
    np.testing.assert_allclose(image_rows, expected, atol=1e-6)
    text_rows = np.asarray(model.language_model.embed_tokens(jnp.asarray(ids[0, [0, 1, 7]])))
    np.testing.assert_allclose(embeds[0, [0, 1, 7]], text_rows, atol=0)
    with pytest.raises(ValueError, match="landmarks"):
        model.embed(ids, pixels)


def test_merged_lora_matches_peft_merge_and_unmerged_logits(emola_run, tmp_path):
    from emola_jax.lora import merge_lora

    out = convert(emola_run["run"], tmp_path / "jax", base=emola_run["root"] / "base",
                  clip=emola_run["root"] / "clip", progress=False)
    model, _ = emola_jax.load_pretrained(out)
    _, lora_state, base_state = nnx.split(model, nnx.LoRAParam, ...)  # the adapters are their own tree
    assert {p[-1] for p, _ in nnx.to_flat_state(lora_state)} == {"lora_a", "lora_b"}
    assert not any(p[-1].startswith("lora") for p, _ in nnx.to_flat_state(base_state))
    merged = merge_lora(model)
    assert merged.config.lora is None and merged.language_model.layers.mlp.up_proj.lora_a is None
    # the merged kernels are what PEFT's merge_and_unload produces
    peft = PeftModel.from_pretrained(_hf_decoder(emola_run["llava"]), emola_run["run"]).merge_and_unload()
    expected = peft.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy().T
    np.testing.assert_allclose(np.asarray(merged.language_model.layers.mlp.down_proj.kernel.get_value()[1]),
                               expected, atol=1e-6)
    ids, pixels, mask = ref.inputs(emola_run["config"], batch=2, pad=[0, 2], image_tokens=5)
    ids = np.where(ids == ref.IMAGE_TOKEN, -200, ids)
    landmarks = np.random.default_rng(1).random((2, 212)).astype(np.float32)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(merged(ids, pixels, mask, landmarks))[valid],
                               np.asarray(model(ids, pixels, mask, landmarks))[valid], atol=1e-4)


def _run_with_adapter(emola_run, folder, **lora_config):
    """The fixture's EmoLA run with another PEFT adapter (non-zero factors) made by PEFT itself."""
    import shutil

    folder.mkdir()
    for name in ("non_lora_trainables.bin", "landmark_feature_projector.bin", "config.json"):
        shutil.copy(emola_run["run"] / name, folder / name)
    peft = get_peft_model(_hf_decoder(emola_run["llava"]), LoraConfig(r=4, lora_alpha=8, **lora_config))
    _randomise_adapters(peft, scale=0.1, seed=17)
    peft.save_pretrained(folder)
    adapted = {n.split(".")[-1] for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    return {**emola_run, "run": folder}, adapted


def _assert_peft_logits(model, setup) -> None:
    """`model` (converted from `setup["run"]`) gives PeftModel's logits on the run, within 1e-4."""
    ids, pixels, mask = ref.inputs(setup["config"], batch=2, pad=[0, 2], image_tokens=5)
    landmarks = np.random.default_rng(1).random((2, 212)).astype(np.float32)
    got = np.asarray(model(np.where(ids == ref.IMAGE_TOKEN, -200, ids), pixels, attention_mask=mask,
                           landmarks=landmarks))
    expected = _torch_reference(setup, ids, pixels, landmarks, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


# Each form of `target_modules` PEFT accepts: (LoraConfig fields, projections it adapts in every layer).
PEFT_TARGET_FORMS = {
    "list of names": (dict(target_modules=["q_proj", "v_proj"]), {"q_proj", "v_proj"}),
    "list of dotted suffixes": (dict(target_modules=["self_attn.o_proj", "mlp.down_proj"]), {"o_proj", "down_proj"}),
    "official regex": (dict(target_modules=r".*self_attn\.(q_proj|v_proj)"), {"q_proj", "v_proj"}),
    "anchored regex": (dict(target_modules=r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj)"), {"gate_proj", "up_proj"}),
    "every layer by index": (dict(target_modules=["k_proj"], layers_to_transform=[0, 1], layers_pattern="layers"),
                             {"k_proj"}),
    "excluded modules": (dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["k_proj"]),
                         {"q_proj", "v_proj"}),
}


@pytest.mark.parametrize("form", list(PEFT_TARGET_FORMS))
def test_every_peft_target_form_imports_to_peft_logits(emola_run, tmp_path, form):
    lora_config, expected = PEFT_TARGET_FORMS[form]
    setup, adapted = _run_with_adapter(emola_run, tmp_path / "run", **lora_config)
    assert adapted == expected  # PEFT's own reading of the form
    out = convert(setup["run"], tmp_path / "jax", base=emola_run["root"] / "base",
                  clip=emola_run["root"] / "clip", progress=False)
    model, config = emola_jax.load_pretrained(out)
    assert set(config.lora.targets) == expected
    _assert_peft_logits(model, setup)


@pytest.mark.parametrize("target_modules, layers, message", [
    (r"model\.layers\.0\.self_attn\.q_proj", None, r"self_attn\.q_proj in layers \[0\] only"),
    (["q_proj"], [1], r"self_attn\.q_proj in layers \[1\] only"),
    (["q_proj", "lm_head"], None, "also adapts lm_head"),
    (".*mm_projector.*", None, r"also adapts model\.mm_projector\.0"),
    ("all-linear", None, "all-linear"),
    (["gate"], None, "adapts none of the decoder's projections"),
])
def test_peft_targets_this_model_cannot_hold_are_refused(emola_run, tmp_path, target_modules, layers, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(emola_run["run"], run)
    adapter = json.loads((run / "adapter_config.json").read_text())
    adapter.update(target_modules=target_modules, layers_to_transform=layers)
    (run / "adapter_config.json").write_text(json.dumps(adapter))
    with pytest.raises(ValueError, match=message):
        convert(run, tmp_path / "jax", base=emola_run["root"] / "base", clip=emola_run["root"] / "clip",
                progress=False)
    assert not (tmp_path / "jax").exists()


def test_official_regex_run_converts_through_the_command_line(emola_run, tmp_path):
    """`run.py convert` on a run whose adapter_config.json holds the official EmoLA regex: the
    converted model gives PeftModel's logits."""
    import subprocess
    import sys

    from tests.processes import ROOT, cpu_env

    setup, _ = _run_with_adapter(emola_run, tmp_path / "run", target_modules=r".*self_attn\.(q_proj|v_proj)")
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "convert", str(setup["run"]), str(tmp_path / "jax"),
                             "--base", str(emola_run["root"] / "base"), "--clip", str(emola_run["root"] / "clip")],
                            env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    model, config = emola_jax.load_pretrained(tmp_path / "jax")
    assert config.lora.targets == ("q_proj", "v_proj")
    _assert_peft_logits(model, setup)
