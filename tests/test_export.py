"""Export back to PyTorch: transformers and PEFT load what `export` writes and compute this project's logits;
import -> export reproduces the source tensors bit for bit; the export streams and never half-publishes."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

import emola_jax
from converters import convert, export, exporter, formats, hf_config
from converters.readers import TensorStore, weight_files
from emola_jax.apps.demo_models import logits_with_prior
from emola_jax.checkpoint import save_pretrained
from emola_jax.config import LoRAConfig
from emola_jax.models import EmolaForConditionalGeneration
from tests import reference as ref
from tests.test_emola_import import EMOLA_RUN_TOL
from tests.test_parity import CONFIGS

TOL = 1e-4


def _tensors(files) -> dict[str, np.ndarray]:
    store = TensorStore(files)
    return {key: store.read(key) for key in store.keys()}


def _assert_bit_identical(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


def _save_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        directory)


def _load_hf(folder) -> LlavaForConditionalGeneration:
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def _emola_inputs(config):
    ids, pixels, mask = ref.inputs(config, batch=2, pad=[0, 2], image_tokens=5)
    ids = np.where(ids == ref.IMAGE_TOKEN, -200, ids)  # LLaVA's own placeholder id
    landmarks = np.random.default_rng(1).random((2, 212)).astype(np.float32)
    return ids, pixels, mask, landmarks


# ---------------------------------------------------------------------------------------------
# hf


@pytest.mark.parametrize(
    "name,dtype,shard", [("gqa", "float32", None), ("tied_embeddings", "float32", "30KB"), ("gqa", "bfloat16", "30KB")]
)
def test_llava_hf_round_trip_is_bit_identical(tmp_path, name, dtype, shard):
    """llava-hf -> convert -> export hf: every tensor, key and dtype as transformers saved them."""
    config = ref.llava_config(**CONFIGS[name])
    hf = ref.build_llava(config).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "src")
    _save_tokenizer(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "jax", dtype=dtype, progress=False)
    out = export(tmp_path / "jax", tmp_path / "hf", max_shard_size=shard or "5GB", progress=False)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("w1 w7 w2").input_ids == [4, 10, 5]  # the tokenizer came along
    _assert_bit_identical(_tensors(weight_files(tmp_path / "src")), _tensors(weight_files(out)))
    if shard:  # sharded as transformers shards: several files and an index naming each key's file
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(weight_files(out)).values())
    else:
        assert not (out / "model.safetensors.index.json").exists()
    assert not (out / exporter.PRIOR_PROJECTOR_FILE).exists()  # plain LLaVA: no prior token
    # the config, read back with transformers' classes, describes the same model
    assert formats.llava_hf_config(out, dtype) == formats.llava_hf_config(tmp_path / "src", dtype)
    loaded = _load_hf(out)
    assert next(loaded.parameters()).dtype == getattr(torch, dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_config_reads_back_as_the_same_model(tmp_path, name):
    config = ref.llava_config(**CONFIGS[name])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(config.to_json_string())
    ours = formats.llava_hf_config(tmp_path / "src", "float32")
    (tmp_path / "out").mkdir()
    hf_config.to_transformers(hf_config.llava_to_hf(ours, "float32")).to_json_file(tmp_path / "out" / "config.json")
    assert formats.llava_hf_config(tmp_path / "out", "float32") == ours


def _lora_checkpoint(tmp_path, *, use_rslora: bool):
    """A llava-hf model converted, then given random non-zero LoRA factors and a changed
    multi-modal projector (as after EmoLA's training, which trains both)."""
    config = ref.llava_config()
    hf = ref.build_llava(config, seed=5)
    hf.save_pretrained(tmp_path / "src")
    base, base_config = emola_jax.load_pretrained(convert(tmp_path / "src", tmp_path / "base", progress=False))
    lora_config = base_config.replace(lora=LoRAConfig(rank=4, alpha=6.0, use_rslora=use_rslora))
    model = EmolaForConditionalGeneration(lora_config, rngs=nnx.Rngs(0))
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(base))}
    rng = np.random.default_rng(7)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[-1] in ("lora_a", "lora_b"):
            var.set_value(np.float32(0.3) * rng.standard_normal(var.get_value().shape, np.float32))
        elif path[0] == "multi_modal_projector":
            value = values[tuple(path)]
            var.set_value(value + np.float32(0.2) * rng.standard_normal(value.shape, np.float32))
        else:
            var.set_value(values[tuple(path)])
    ckpt = save_pretrained(model, tmp_path / "lora", source={"format": "llava-hf", "src": str(tmp_path / "src")})
    return config, hf, model, ckpt


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_hf_and_peft_adapter_match_unmerged_model(tmp_path, use_rslora):
    config, hf, model, ckpt = _lora_checkpoint(tmp_path, use_rslora=use_rslora)
    ids, pixels, mask = ref.inputs(config, batch=2, pad=[0, 3])
    expected = np.asarray(model(ids, pixels, attention_mask=mask))  # unmerged: x @ W + scale * x @ A @ B
    valid = mask.astype(bool)
    assert np.abs(ref.hf_logits(hf, ids, pixels, mask) - expected)[valid].max() > 100 * TOL  # the adapter matters

    merged = _load_hf(export(ckpt, tmp_path / "hf", progress=False))
    np.testing.assert_allclose(ref.hf_logits(merged, ids, pixels, mask)[valid], expected[valid], atol=TOL, rtol=0)

    adapter = export(ckpt, tmp_path / "peft", fmt="peft", progress=False)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["use_rslora"]) == (4, 6, use_rslora)
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "src")
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]  # trained beside the adapters
    # over the llava-hf model the run came from (its own projector) and over the --no-merge export
    for base_dir in (tmp_path / "src", export(ckpt, tmp_path / "base_hf", merge=False, progress=False)):
        peft = PeftModel.from_pretrained(_load_hf(base_dir), adapter).eval()
        lora_layers = [n for n, _ in peft.named_modules() if n.endswith("lora_A")]
        assert len(lora_layers) == 7 * 2 and all("language_model" in n for n in lora_layers)  # not the CLIP q/k/v
        np.testing.assert_allclose(ref.hf_logits(peft, ids, pixels, mask)[valid], expected[valid], atol=TOL, rtol=0)

    # the adapter file holds exactly the keys and shapes PEFT itself writes for this adapter config
    own = get_peft_model(ref.build_llava(config), LoraConfig(
        r=4, lora_alpha=6, use_rslora=use_rslora, target_modules=adapter_config["target_modules"],
        modules_to_save=["multi_modal_projector"]))
    own.save_pretrained(tmp_path / "peft_own")
    expected_keys = _tensors([tmp_path / "peft_own" / "adapter_model.safetensors"])
    got = _tensors([adapter / "adapter_model.safetensors"])
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected_keys.items()}
    assert any("multi_modal_projector" in k for k in got)
    assert all(v.dtype == np.float32 for v in got.values())


# ---------------------------------------------------------------------------------------------
# official EmoLA layout


@pytest.fixture(scope="module")
def emola_ckpt(emola_run, tmp_path_factory):
    root = emola_run["root"]
    return convert(emola_run["run"], tmp_path_factory.mktemp("ckpt") / "jax", base=root / "base",
                   clip=root / "clip", progress=False)


@pytest.mark.parametrize("adapter_format", ["safetensors", "bin"])
def test_emola_round_trip_is_bit_identical(emola_run, emola_ckpt, tmp_path, adapter_format):
    run = emola_run["run"]
    out = export(emola_ckpt, tmp_path / "run", fmt="emola", adapter_format=adapter_format, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "adapter_config.json", f"adapter_model.{adapter_format}", "config.json",
        "landmark_feature_projector.bin", "non_lora_trainables.bin"])
    for ours, theirs in [(f"adapter_model.{adapter_format}", "adapter_model.safetensors"),
                         ("non_lora_trainables.bin", "non_lora_trainables.bin"),
                         ("landmark_feature_projector.bin", "landmark_feature_projector.bin")]:
        _assert_bit_identical(_tensors([run / theirs]), _tensors([out / ours]))
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (out, run))
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    for field in ("r", "lora_alpha", "peft_type", "bias", "use_rslora"):
        assert ours[field] == theirs[field], field
    assert ours["task_type"] == "CAUSAL_LM"  # as the official training script's LoraConfig
    # and the importer reads the export back to the same checkpoint
    root = emola_run["root"]
    again = convert(out, tmp_path / "again", base=root / "base", clip=root / "clip", progress=False)
    (m1, c1), (m2, c2) = emola_jax.load_pretrained(emola_ckpt), emola_jax.load_pretrained(again)
    assert c1 == c2
    s1, s2 = (dict(nnx.to_flat_state(nnx.state(m))) for m in (m1, m2))
    assert s1.keys() == s2.keys()
    for path in s1:
        np.testing.assert_array_equal(np.asarray(s1[path].get_value()), np.asarray(s2[path].get_value()))


def test_emola_to_hf_with_prior_token_and_peft_match_the_model(emola_run, emola_ckpt, tmp_path):
    model, config = emola_jax.load_pretrained(emola_ckpt)
    ids, pixels, mask, landmarks = _emola_inputs(emola_run["config"])
    expected = np.asarray(model(ids, pixels, attention_mask=mask, landmarks=landmarks))
    valid = mask.astype(bool)

    out = export(emola_ckpt, tmp_path / "hf", progress=False)
    prior_file = out / exporter.PRIOR_PROJECTOR_FILE
    assert sorted(load_file(prior_file)) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    got = logits_with_prior(_load_hf(out), prior_file, ids, pixels, landmarks, mask)
    np.testing.assert_allclose(got[valid], expected[valid], atol=EMOLA_RUN_TOL, rtol=0)

    base = export(emola_ckpt, tmp_path / "base", merge=False, progress=False)
    adapter = export(emola_ckpt, tmp_path / "peft", fmt="peft", progress=False)
    peft = PeftModel.from_pretrained(_load_hf(base), adapter).eval()
    got = logits_with_prior(peft, adapter / exporter.PRIOR_PROJECTOR_FILE, ids, pixels, landmarks, mask)
    np.testing.assert_allclose(got[valid], expected[valid], atol=EMOLA_RUN_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# streaming, staging, errors, command line


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    ref.build_llava(ref.llava_config()).save_pretrained(root / "src")
    return convert(root / "src", root / "jax", progress=False)


def test_export_reads_one_layer_group_at_a_time(small_ckpt, tmp_path, monkeypatch):
    calls = []
    original = exporter.read_params

    def spy(path, specs):
        calls.append({k: int(np.prod(s.shape)) * s.dtype.itemsize for k, s in specs.items()})
        return original(path, specs)

    monkeypatch.setattr(exporter, "read_params", spy)
    export(small_ckpt, tmp_path / "hf", read_bytes=1, progress=False)  # the smallest groups: one layer or weight
    read = [k for call in calls for k in call]
    assert len(read) == len(set(read)) == 80  # every stored entry read once
    layer_calls = [c for c in calls if any("layers" in k for k in c)]
    assert len(layer_calls) == 3 + 2  # one call per vision layer, one per decoder layer
    assert all(len({k[k.index("layers") + 1] for k in c}) == 1 for c in layer_calls)
    total = sum(n for c in calls for n in c.values())
    assert max(sum(c.values()) for c in calls) < total / 3


def test_non_empty_out_is_refused_and_failure_leaves_nothing(small_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(small_ckpt, out, progress=False)
    assert (out / "keep.txt").exists()

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("disk full")
        return original(*args)

    original = exporter._to_file_layout
    monkeypatch.setattr(exporter, "_to_file_layout", failing)
    with pytest.raises(OSError, match="disk full"):
        export(small_ckpt, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the previous folder untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    monkeypatch.undo()
    export(small_ckpt, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_formats_that_need_lora_or_a_prior_token_are_refused(small_ckpt, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export(small_ckpt, tmp_path / "peft", fmt="peft", progress=False)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export(small_ckpt, tmp_path / "emola", fmt="emola", progress=False)
    with pytest.raises(ValueError, match="outside the checkpoint"):
        export(small_ckpt, small_ckpt / "hf", progress=False)
    with pytest.raises(ValueError, match="size"):
        export(small_ckpt, tmp_path / "hf", max_shard_size="lots", progress=False)
    assert not any(tmp_path.iterdir())


def test_command_line(small_ckpt, tmp_path, capsys):
    import run

    assert run.main(["export", str(small_ckpt), str(tmp_path / "hf"), "--format", "hf", "--dtype", "bfloat16",
                     "--max-shard-size", "20KB"]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    dtypes = {v.dtype for v in _tensors(weight_files(tmp_path / "hf")).values()}
    assert dtypes == {np.dtype("bfloat16")}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run.main(["export", str(small_ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
