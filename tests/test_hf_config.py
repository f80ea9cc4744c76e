"""Hugging Face configs <-> ours: each `*_to_hf` / `*_from_hf` pair gives back the config it was
given, and a config transformers itself made reads in and writes out with every field we represent
unchanged. Exported EmoLA runs say how their images were preprocessed, as LLaVA's inference reads it."""

import dataclasses
import json

import pytest
from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

from converters import convert, export, hf_config
from emola_jax.checkpoint import PAD_TO_SQUARE, SOURCE_FILE
from emola_jax.config import EmolaConfig, LoRAConfig, RopeScaling, TextConfig, VisionConfig

TEXTS = {
    "vicuna_7b": TextConfig(head_dim=128),
    "gqa_biases_tied": TextConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "linear": TextConfig(head_dim=128, rope_theta=500.0, rope_scaling=RopeScaling("linear", 2.0)),
    "dynamic": TextConfig(head_dim=128, rope_scaling=RopeScaling("dynamic", 4.0)),
    "llama3": TextConfig(head_dim=128, rope_theta=500000.0, max_position_embeddings=131072, rope_scaling=RopeScaling(
        "llama3", 8.0, original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0)),
}
VISIONS = {
    "vit_l_336": VisionConfig(),
    "tiny": VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=28, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu"),
}


def _json(data):
    return json.loads(json.dumps(data))  # what a config.json holds (tuples become lists)


def _assert_same_fields(ours: dict, theirs, skip=("model_type", "architectures")):
    """Every field of our dict has the value transformers' config object has."""
    for key, value in ours.items():
        if key not in skip and not isinstance(value, dict):
            assert getattr(theirs, key) == value, key


# --- LLaMA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TEXTS))
def test_llama_round_trip(name):
    text = TEXTS[name]
    assert hf_config.llama_from_hf(_json(hf_config.llama_to_hf(text))) == text


def test_llama_head_dim_left_out_is_the_one_transformers_derives():
    text = dataclasses.replace(TEXTS["gqa_biases_tied"], head_dim=None)
    assert "head_dim" not in hf_config.llama_to_hf(text)
    assert hf_config.llama_from_hf(hf_config.llama_to_hf(text)) == dataclasses.replace(text, head_dim=12)


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
])
def test_llama_from_transformers_keeps_every_field(rope):
    theirs = LlamaConfig(vocab_size=131, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                         num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=128,
                         rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=True,
                         **({} if rope is None else {"rope_parameters": rope}))
    back = hf_config.llama_to_hf(hf_config.llama_from_hf(theirs.to_dict()))
    _assert_same_fields(back, theirs)
    assert back["head_dim"] == theirs.head_dim == 8
    assert back["rope_parameters"] == {k: v for k, v in theirs.rope_parameters.items() if v is not None}


def test_llama_reads_the_transformers_4_rope_spelling():
    """LLaVA's and EmoLA's run configs (transformers 4.31) write `rope_theta` and `rope_scaling.type`."""
    text = hf_config.llama_from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 500.0,
                                    "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (text.rope_theta, text.rope_scaling) == (500.0, RopeScaling("linear", 2.0))


# --- CLIP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VISIONS))
def test_clip_round_trip(name):
    assert hf_config.clip_from_hf(_json(hf_config.clip_to_hf(VISIONS[name]))) == VISIONS[name]


def test_clip_from_transformers_keeps_every_field():
    theirs = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3,
                              image_size=42, patch_size=14, layer_norm_eps=1e-6, projection_dim=16)
    ours = hf_config.clip_from_hf(theirs.to_dict())
    _assert_same_fields(hf_config.clip_to_hf(ours), theirs)
    # a whole CLIPConfig (openai/clip-vit-large-patch14-336's config.json): its vision tower
    full = CLIPConfig(vision_config=theirs.to_dict(), text_config={"hidden_size": 16, "num_attention_heads": 2})
    assert hf_config.clip_from_hf(full.to_dict()) == ours


# --- llava-hf ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,layer,bias", [("default", -2, True), ("full", 1, False)])
@pytest.mark.parametrize("text", ["gqa_biases_tied", "llama3"])
def test_llava_round_trip(strategy, layer, bias, text):
    config = EmolaConfig(vision=VISIONS["tiny"], text=TEXTS[text], vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, projector_bias=bias, image_token_id=99,
                         prior_position="off", dtype="bfloat16")
    data = _json(hf_config.llava_to_hf(config, "bfloat16"))
    assert data["image_seq_length"] == 4 + (strategy == "full")  # what LlavaForConditionalGeneration fills
    assert hf_config.llava_from_hf(data, "bfloat16") == config


def test_llava_from_transformers_keeps_every_field():
    theirs = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        image_token_index=99, image_seq_length=5, vision_feature_layer=-3, vision_feature_select_strategy="full",
        multimodal_projector_bias=False, tie_word_embeddings=True,
    )
    back = hf_config.llava_to_hf(hf_config.llava_from_hf(theirs.to_dict()))
    _assert_same_fields(back, theirs)
    _assert_same_fields(back["text_config"], theirs.text_config)
    _assert_same_fields(back["vision_config"], theirs.vision_config)
    # and transformers builds the same config object from our dict
    rebuilt = hf_config.to_transformers(back)
    assert type(rebuilt) is LlavaConfig and hf_config.llava_from_hf(rebuilt.to_dict()) == hf_config.llava_from_hf(
        theirs.to_dict())


def test_llava_refuses_several_feature_layers():
    config = EmolaConfig(vision=VISIONS["tiny"], text=TEXTS["gqa_biases_tied"], prior_position="off")
    data = hf_config.llava_to_hf(config)
    with pytest.raises(ValueError, match=r"cfg\.json: vision_feature_layer \[-2, -1\]"):
        hf_config.llava_from_hf({**data, "vision_feature_layer": [-2, -1]}, where="cfg.json")


# --- original LLaVA-1.5 / EmoLA runs ----------------------------------------------------------


def _run_config(**changes) -> EmolaConfig:
    return EmolaConfig(**{"vision": VISIONS["tiny"], "text": TEXTS["gqa_biases_tied"], "image_token_id": -200,
                          "prior_position": "off", **changes})


@pytest.mark.parametrize("changes", [{}, dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
                                     dict(dtype="bfloat16")])
@pytest.mark.parametrize("text", ["gqa_biases_tied", "linear", "llama3"])
def test_run_round_trip(changes, text):
    config = _run_config(**changes).replace(text=TEXTS[text])
    data = _json(hf_config.run_to_hf(config, config.dtype))
    assert data["architectures"] == ["LlavaLlamaForCausalLM"] and data["model_type"] == "llava_llama"
    assert hf_config.run_from_hf(data, config.vision, config.dtype) == config


def test_emola_run_config_names_the_prior_and_leaves_the_rest_to_the_run_files():
    config = _run_config(prior_position="after", lora=LoRAConfig(rank=4, alpha=8.0))
    data = _json(hf_config.run_to_hf(config, "float32"))
    assert data["architectures"] == ["EmoLlavaLlamaForCausalLM"] and data["landmark_feature_hidden_size"] == 212
    assert hf_config.priors_from_hf(data) == config.priors
    assert hf_config.run_from_hf(data, config.vision) == config.replace(prior_position="off", lora=None)


def test_run_from_a_llava_config_keeps_every_field():
    """A LLaVA-1.5 `config.json` as LLaVA's training saves it: transformers' LlamaConfig and `mm_*` fields."""
    llama = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    theirs = {**llama.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_hidden_size": 32, "mm_vision_tower": "openai/clip-vit-large-patch14-28",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad"}
    ours = hf_config.run_from_hf(theirs, VISIONS["tiny"])
    back = hf_config.run_to_hf(ours, "float32", pad_to_square=hf_config.pad_from_hf(theirs))
    for key in [*hf_config.LLAMA_FIELDS, "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias",
                "mlp_bias", "image_aspect_ratio"] + [k for k in theirs if k.startswith("mm_")]:
        if key != "mm_vision_tower":  # a name: ours is the size's, which is what the check reads
            assert back[key] == theirs[key], key
    assert back["mm_vision_tower"].endswith("-28")
    assert back["rope_theta"] == llama.rope_parameters["rope_theta"] and back["rope_scaling"] is None


def test_run_refuses_what_it_cannot_represent():
    data = hf_config.run_to_hf(_run_config(), "float32")
    with pytest.raises(ValueError, match="r.json: mm_projector_type 'linear'"):
        hf_config.run_from_hf({**data, "mm_projector_type": "linear"}, VISIONS["tiny"], where="r.json")
    with pytest.raises(ValueError, match="mm_vision_select_feature 'cls'"):
        hf_config.run_from_hf({**data, "mm_vision_select_feature": "cls"}, VISIONS["tiny"])
    with pytest.raises(ValueError, match="336 px.*28 px"):
        hf_config.run_from_hf({**data, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}, VISIONS["tiny"])


@pytest.mark.parametrize("pad,field", [(True, "pad"), (False, "square"), (None, None)])
def test_image_padding_round_trip(pad, field):
    data = hf_config.run_to_hf(_run_config(), "float32", pad_to_square=pad)
    assert data.get("image_aspect_ratio") == field  # LLaVA's process_images pads for "pad" alone
    assert hf_config.pad_from_hf(data) is pad


# --- the image padding a checkpoint records, and what its export says --------------------------


def test_imported_emola_run_keeps_its_image_padding_through_export(emola_run, tmp_path):
    root = emola_run["root"]
    assert json.loads((emola_run["run"] / "config.json").read_text())["image_aspect_ratio"] == "pad"
    ckpt = convert(emola_run["run"], tmp_path / "jax", base=root / "base", clip=root / "clip", progress=False)
    assert json.loads((ckpt / SOURCE_FILE).read_text())[PAD_TO_SQUARE] is True
    out = export(ckpt, tmp_path / "run", fmt="emola", progress=False)
    assert json.loads((out / "config.json").read_text())["image_aspect_ratio"] == "pad"


@pytest.mark.parametrize("pad,field", [(True, "pad"), (False, "square")])
def test_a_trained_model_exports_the_image_padding_it_was_trained_with(tmp_path, pad, field):
    import configs
    from emola_jax.data.pipeline import PipelineConfig
    from emola_jax.data.synthetic import SyntheticData, SyntheticLoader
    from emola_jax.train.loop import train

    experiment = configs.load("tiny")
    experiment = dataclasses.replace(
        experiment, train=dataclasses.replace(experiment.train, steps=1, checkpoint_every=1),
        data=PipelineConfig(annotations=str(tmp_path / "train.json"), pad_to_square=pad))
    # the batches themselves need no images: the record is the data config's
    loader = SyntheticLoader(SyntheticData(batch_size=8, seq_length=48), experiment.model, 0, 1)
    model = train(experiment, tmp_path / "work", progress=False, loader=loader)["model"]
    assert json.loads((tmp_path / "work" / "model" / SOURCE_FILE).read_text())[PAD_TO_SQUARE] is pad
    out = export(model, tmp_path / "run", fmt="emola", progress=False)
    assert json.loads((out / "config.json").read_text())["image_aspect_ratio"] == field
