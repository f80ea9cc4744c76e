"""LoRA's rules against PEFT's own: target matching on module names, the fold, and the config
round trip through PEFT's `LoraConfig`."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists

from emola_jax.config import LoRAConfig
from emola_jax.lora import fold, from_peft_config, peft_matches, to_peft_config

NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.11.mlp.down_proj",
    "model.layers.1.mlp.gate_proj", "language_model.model.layers.2.self_attn.q_proj", "lm_head",
    "model.mm_projector.0", "q_proj", "model.vision_tower.encoder.layers.4.self_attn.q_proj",
    "model.h.2.attn.q_proj", "model.layers.2.experts.1.q_proj",
]
CONFIGS = [
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=["self_attn.q_proj"]),
    dict(target_modules=["q_proj"]),  # a module named exactly q_proj: every layer, index rules aside
    dict(target_modules=r".*self_attn\.(q_proj|v_proj)"),
    dict(target_modules=r"model\.layers\.\d+\.mlp\..*"),
    dict(target_modules="q_proj"),  # a string is a regex over the whole name: matches only `q_proj`
    dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[0, 3], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=2, layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj"], layers_to_transform=[2]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*vision_tower.*"),
]


@pytest.mark.parametrize("fields", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_target_matching_is_peft_s(fields):
    config = LoraConfig(**fields)
    for name in NAMES:
        expected = bool(check_target_module_exists(config, name)) and not type(
            check_target_module_exists(config, name)).__name__.startswith("_Excluded")
        got = peft_matches(fields["target_modules"], name, exclude_modules=fields.get("exclude_modules"),
                           layers_to_transform=fields.get("layers_to_transform"),
                           layers_pattern=fields.get("layers_pattern"))
        assert got == expected, name


def test_fold_is_peft_s_merge():
    rng = np.random.default_rng(0)
    kernel, a, b = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 3, 5))
    module = torch.nn.Module()
    module.q_proj = torch.nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        module.q_proj.weight.copy_(torch.tensor(kernel[1].T))
    wrapped = get_peft_model(module, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"]))
    with torch.no_grad():
        wrapped.base_model.model.q_proj.lora_A["default"].weight.copy_(torch.tensor(a[1].T))
        wrapped.base_model.model.q_proj.lora_B["default"].weight.copy_(torch.tensor(b[1].T))
    merged = wrapped.merge_and_unload().q_proj.weight.detach().numpy().T
    got = np.asarray(fold(jnp.asarray(kernel, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                          2.0))
    np.testing.assert_allclose(got[1], merged, atol=1e-5)


@pytest.mark.parametrize("targets, rslora", [(("q_proj", "v_proj"), False), (("down_proj",), True)])
def test_peft_config_round_trip(targets, rslora):
    lora = LoRAConfig(rank=8, alpha=16.0, targets=targets, use_rslora=rslora, dropout=0.05)
    data = to_peft_config(lora, target_modules=list(targets), task_type="CAUSAL_LM", base=None)
    assert LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"}).r == 8  # PEFT reads it
    back = from_peft_config(data, module_name="model.layers.{i}.{linear}", num_layers=2, where="test")
    assert back == lora


def test_config_targets_are_checked():
    for good in itertools.chain(["q_proj"], ["self_attn.q_proj"], ["mlp.down_proj", "k_proj"]):
        LoRAConfig(targets=(good,))
    with pytest.raises(ValueError, match="'query' names none of the decoder's projections"):
        LoRAConfig(targets=("query",))
