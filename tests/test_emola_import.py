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
from converters import convert
from emola_jax.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.models import EmolaForConditionalGeneration
from tests import reference as ref
from tests.reference import hf_decoder as _hf_decoder
from tests.reference import randomise_adapters as _randomise_adapters

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
