"""Several facial prior tokens and the image side without visual tokens: the config's forms, logits
equal to a PyTorch EmoLA written here (HF CLIP + projector, one MLP per prior, HF decoder), and
exports that carry every prior's projector."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import emola_jax
from converters import convert, export, exporter
from converters.readers import TensorStore
from emola_jax import weights
from emola_jax.apps.demo_models import logits_with_prior
from emola_jax.checkpoint import save_pretrained
from emola_jax.config import EmolaConfig, LoRAConfig, PriorToken, build, differences, override
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.models.emola import check_inputs
from emola_jax.models.tree import abstract_model
from emola_jax.train.config import EMOLA_TRAINABLE, Experiment, FromBase, TrainConfig
from tests import reference as ref

TOL = 1e-4
TWO = (PriorToken("2d106det", 212), PriorToken("dlib68", 136))


# ---------------------------------------------------------------------------------------------
# config


def test_prior_dim_is_the_sum_and_older_files_still_load(tmp_path):
    config = EmolaConfig(priors=TWO)
    assert config.prior_dim == 348 and config.image_seq_length == 576 + 2
    assert EmolaConfig.from_dict(config.to_dict()) == config
    old = EmolaConfig().to_dict()
    del old["priors"], old["visual_tokens"]
    old["prior_dim"] = 136  # config.json as written before several priors
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert EmolaConfig.load(tmp_path / "config.json").priors == (PriorToken("2d106det", 136),)
    experiment = build(Experiment, {"model": {"prior_dim": 100, "lora": None}})
    assert experiment.model.priors == (PriorToken("2d106det", 100),)
    with pytest.raises(ValueError, match="not both"):
        EmolaConfig.from_dict({"prior_dim": 10, "priors": [{"name": "x", "dim": 3}]})


def test_priors_and_visual_tokens_from_the_command_line():
    two = '[{"name": "2d106det", "dim": 212}, {"name": "dlib68", "dim": 136}]'
    config = override(EmolaConfig(), [f"priors={two}", "prior_position=before"])
    assert config.priors == TWO and config.prior_dim == 348
    assert override(EmolaConfig(), ["prior_dim=136"]).priors == (PriorToken("2d106det", 136),)
    assert override(EmolaConfig(), ["visual_tokens=false"]).image_seq_length == 1
    assert override(EmolaConfig(priors=TWO), ["visual_tokens=false"]).image_seq_length == 2
    base = override(FromBase(), [f"priors={two}"])
    assert base.prior_dim == 348 and base.apply_to(EmolaConfig()).priors == TWO
    for bad, message in [("visual_tokens=false", "no image-side token"), ("priors=[]", "at least one"),
                         ('priors=[{"name": "a.b", "dim": 3}]', "letters"),
                         ('priors=[{"name": "x", "dim": 3}, {"name": "x", "dim": 4}]', "distinct"),
                         ('priors=[{"name": "x", "dim": 0}]', "at least 1")]:
        with pytest.raises(ValueError, match=message):
            override(EmolaConfig(prior_position="off"), [bad])


def test_default_trainable_patterns_cover_every_prior_projector():
    from emola_jax.train.step import learning_rate_for

    config = ref.TINY.replace(prior_position="after", priors=TWO + (PriorToken("mesh-478", 5),))
    names = [weights.path_name(p) for p in weights.flat(abstract_model(config))]
    projectors = [n for n in names if n.startswith("prior_projector")]
    assert {n.split("/")[0] for n in projectors} == {"prior_projector", "prior_projector_dlib68",
                                                     "prior_projector_mesh-478"}
    assert all(learning_rate_for(n, EMOLA_TRAINABLE) == 1e-4 for n in projectors)
    assert all(learning_rate_for(n, TrainConfig().trainable) is not None for n in projectors)


# ---------------------------------------------------------------------------------------------
# parity with PyTorch


def _mlp(in_dim: int, out_dim: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(in_dim, out_dim), torch.nn.GELU(), torch.nn.Linear(out_dim, out_dim))
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(3.0)  # prior tokens as large as the visual ones, so a misplaced token shows
    return mlp.eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny llava-hf model and its conversion (no prior token)."""
    tmp = tmp_path_factory.mktemp("priors")
    hf_config = ref.llava_config()
    hf = ref.build_llava(hf_config)
    hf.save_pretrained(tmp / "hf")
    model, config = emola_jax.load_pretrained(convert(tmp / "hf", tmp / "jax", progress=False))
    return dict(hf=hf, hf_config=hf_config, config=config, flat=weights.flat(model))


def _emola(plain, priors, position, visual_tokens):
    """The converted LLaVA with one random MLP per prior: the JAX model, its config and the torch MLPs."""
    config = plain["config"].replace(priors=priors, prior_position=position, visual_tokens=visual_tokens)
    hidden = config.text.hidden_size
    mlps = [_mlp(p.dim, hidden, seed=20 + i) for i, p in enumerate(priors)]
    values = dict(plain["flat"])
    for prior, mlp in zip(priors, mlps, strict=True):
        for i, layer in ((0, "linear_1"), (2, "linear_2")):
            values[(prior.projector_name, layer, "kernel")] = mlp[i].weight.detach().numpy().T
            values[(prior.projector_name, layer, "bias")] = mlp[i].bias.detach().numpy()
    return weights.from_flat(abstract_model(config), values), config, mlps


def _torch_logits(plain, mlps, dims, position, visual_tokens, ids, pixels, landmarks, mask):
    """EmoLA's image side in PyTorch: [CLIP tokens] and one token per prior MLP (features split by
    `dims`), prior tokens before or after, spliced at the placeholders and fed as `inputs_embeds`."""
    hf = plain["hf"]
    with torch.no_grad():
        features = torch.split(torch.tensor(landmarks), list(dims), dim=1)
        prior = torch.stack([mlp(f) for mlp, f in zip(mlps, features, strict=True)], dim=1)
        parts = [prior]
        if visual_tokens:
            visual = torch.stack(hf.model.get_image_features(
                pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), return_dict=True).pooler_output)
            parts = [visual, prior] if position == "after" else [prior, visual]
        image_side = torch.cat(parts, dim=1)
        ids_t = torch.tensor(ids)
        is_image = ids_t == ref.IMAGE_TOKEN
        embeds = hf.get_input_embeddings()(torch.where(is_image, 0, ids_t))
        embeds[is_image] = image_side.reshape(-1, image_side.shape[-1])
        return hf(inputs_embeds=embeds, attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(ref.position_ids(mask))).logits.numpy()


@pytest.mark.parametrize("priors,position,visual_tokens", [
    (TWO, "after", True), (TWO, "before", True), (TWO[:1], "after", False), (TWO, "before", False),
], ids=["two_after", "two_before", "prior_only", "two_prior_only"])
def test_prior_tokens_match_pytorch(plain, priors, position, visual_tokens):
    model, config, mlps = _emola(plain, priors, position, visual_tokens)
    n_visual = ref.image_seq_length(plain["hf_config"]) if visual_tokens else 0
    assert config.image_seq_length == n_visual + len(priors)
    ids, pixels, mask = ref.inputs(plain["hf_config"], batch=2, pad=[0, 2], image_tokens=config.image_seq_length)
    landmarks = np.random.default_rng(3).random((2, config.prior_dim)).astype(np.float32)
    check_inputs(config, ids, pixels, mask, landmarks, padding="left")
    got = np.asarray(model(ids, pixels, attention_mask=mask, landmarks=landmarks))
    expected = _torch_logits(plain, mlps, [p.dim for p in priors], position, visual_tokens, ids, pixels, landmarks,
                             mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
    # each prior token follows its own slice of the features: changing the last prior's moves the logits
    moved = landmarks.copy()
    moved[:, -priors[-1].dim:] += 1.0
    assert np.abs(np.asarray(model(ids, pixels, attention_mask=mask, landmarks=moved)) - got).max() > 1e-3


def test_prior_only_model_checks_its_inputs(plain):
    model, config, _ = _emola(plain, TWO, "after", False)
    ids, pixels, mask = ref.inputs(plain["hf_config"], batch=1, image_tokens=3)
    landmarks = np.zeros((1, 348), np.float32)
    with pytest.raises(ValueError, match=r"exactly 2 per row \(the 2 prior tokens\)"):
        check_inputs(config, ids, pixels, mask, landmarks)
    ids, pixels, mask = ref.inputs(plain["hf_config"], batch=1, image_tokens=2)
    with pytest.raises(ValueError, match=r"landmarks have shape \(1, 212\); this model takes \[1, 348\]"):
        check_inputs(config, ids, pixels, mask, landmarks[:, :212])
    with pytest.raises(ValueError, match="348"):
        model(ids, pixels, attention_mask=mask)


# ---------------------------------------------------------------------------------------------
# export and import carry every projector


@pytest.fixture(scope="module")
def two_prior_ckpt(tmp_path_factory):
    """A random tiny EmoLA with two prior tokens (after) and LoRA, saved as a checkpoint."""
    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    config = ref.TINY.replace(priors=TWO, prior_position="after", lora=lora)
    model = EmolaForConditionalGeneration(config, rngs=nnx.Rngs(3))
    values = {path: (np.random.default_rng(len(path)).standard_normal(v.shape).astype(np.float32) * 0.2
                     if path[-1] == "lora_b" else np.asarray(v)) for path, v in weights.flat(model).items()}
    model = weights.from_flat(abstract_model(config), values)
    return save_pretrained(model, tmp_path_factory.mktemp("two") / "ckpt")


def test_emola_export_writes_every_prior_and_reads_back(two_prior_ckpt, tmp_path):
    base = export(two_prior_ckpt, tmp_path / "base", merge=False, progress=False)
    run = export(two_prior_ckpt, tmp_path / "run", fmt="emola", progress=False)
    assert exporter.landmark_file(TWO[1]) == "landmark_feature_projector_dlib68.bin"
    names = {p.name for p in run.iterdir()}
    assert {"landmark_feature_projector.bin", "landmark_feature_projector_dlib68.bin"} <= names
    official = TensorStore([run / "landmark_feature_projector.bin"])
    assert sorted(official.keys()) == [f"model.landmark_feature_projector.{i}.{w}" for i in (0, 2)
                                       for w in ("bias", "weight")]
    assert tuple(official.shape("model.landmark_feature_projector.0.weight")) == (48, 212)
    dlib = TensorStore([run / "landmark_feature_projector_dlib68.bin"])
    assert tuple(dlib.shape("model.landmark_feature_projector_dlib68.0.weight")) == (48, 136)
    run_config = json.loads((run / "config.json").read_text())
    assert run_config["landmark_feature_hidden_size"] == 212
    assert run_config["face_priors"] == [{"name": "2d106det", "dim": 212}, {"name": "dlib68", "dim": 136}]

    again = convert(run, tmp_path / "again", base=base, progress=False)
    (m1, c1), (m2, c2) = emola_jax.load_pretrained(two_prior_ckpt), emola_jax.load_pretrained(again)
    assert differences(c1, c2, skip=frozenset({"text.head_dim"})) == [] and c2.priors == TWO  # head_dim: resolved
    s1, s2 = weights.flat(m1), weights.flat(m2)
    assert s1.keys() == s2.keys()
    for path in s1:
        np.testing.assert_array_equal(np.asarray(s1[path]), np.asarray(s2[path]), err_msg=weights.path_name(path))

    (run / "landmark_feature_projector_dlib68.bin").unlink()
    with pytest.raises(FileNotFoundError, match="dlib68"):
        convert(run, tmp_path / "broken", base=base, progress=False)


def test_hf_export_carries_every_prior_and_matches_the_model(two_prior_ckpt, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, config = emola_jax.load_pretrained(two_prior_ckpt)
    out = export(two_prior_ckpt, tmp_path / "hf", progress=False)
    files = [out / exporter.prior_file(p) for p in config.priors]
    assert [f.name for f in files] == ["prior_projector.safetensors", "prior_projector_dlib68.safetensors"]
    with safe_open(files[1], "pt") as f:
        meta = f.metadata()
    assert meta["prior_name"] == "dlib68" and meta["prior_dim"] == "136" and meta["prior_index"] == "1"
    assert json.loads(meta["priors"]) == [{"name": "2d106det", "dim": 212}, {"name": "dlib68", "dim": 136}]
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hf_config = ref.llava_config()
    ids, pixels, mask = ref.inputs(hf_config, batch=2, pad=[0, 2], image_tokens=config.image_seq_length)
    landmarks = np.random.default_rng(5).random((2, config.prior_dim)).astype(np.float32)
    expected = np.asarray(model(ids, pixels, attention_mask=mask, landmarks=landmarks))
    got = logits_with_prior(hf, files, ids, pixels, landmarks, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)


def test_prior_only_checkpoint_has_no_pytorch_export(tmp_path):
    config = ref.TINY.replace(priors=TWO[:1], prior_position="after", visual_tokens=False)
    ckpt = save_pretrained(EmolaForConditionalGeneration(config, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="visual_tokens false"):
        export(ckpt, tmp_path / "hf", progress=False)
