"""Training: the loss and LoRA gradients match transformers + PEFT; meshes, processes and resumes
change nothing; faults are caught before they reach a checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import AbstractMesh
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import configs
import run
from converters import convert
from emola_jax.checkpoint import load_config, save_pretrained
from emola_jax.config import EmolaConfig, LoRAConfig
from emola_jax.data.pipeline import Batch
from emola_jax.data.synthetic import SyntheticData, SyntheticLoader
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.models.tree import abstract_model
from emola_jax.sharding import (
    MeshConfig,
    logical_axes_table,
    make_mesh,
    param_sharding,
    partition_spec,
    state_shardings,
)
from emola_jax.train import step as train_step
from emola_jax.train.checkpoints import TrainCheckpoints, abstract_like
from emola_jax.train.config import EMOLA_TRAINABLE, Experiment, FromBase, TrainConfig
from emola_jax.train.init import training_config
from emola_jax.train.loop import Trainer, next_batch, train
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny(steps: int = 3, **train_changes) -> Experiment:
    experiment = configs.load("tiny")
    return dataclasses.replace(
        experiment,
        train=dataclasses.replace(experiment.train, steps=steps, **train_changes),
        data=SyntheticData(batch_size=8, seq_length=48),
    )


# --- the loss and its gradients against transformers + PEFT -----------------------------------


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory):
    """A tiny transformers LLaVA, saved and converted: the frozen base of a run."""
    directory = tmp_path_factory.mktemp("llava")
    config = ref.llava_config()
    model = ref.build_llava(config)
    model.save_pretrained(directory / "hf")
    convert(directory / "hf", directory / "base")
    return config, directory / "base"


@pytest.mark.parametrize("attention", ["xla", "blockwise", "splash"])  # splash: Pallas interpret mode
def test_loss_and_lora_gradients_match_peft(llava_base, attention):
    config, base = llava_base
    llava = ref.build_llava(config)  # the same weights as the converted base, unwrapped
    experiment = Experiment(
        model=load_config(base).replace(lora=LoRAConfig(rank=4, alpha=8.0), prior_position="off"),
        train=TrainConfig(base=str(base), steps=1, attention=attention, remat="full",
                          trainable=((r"language_model/.*/lora_[ab]", 1e-3),)),
    )
    trainer = Trainer(experiment, make_mesh(MeshConfig(data=1)))
    rng = np.random.default_rng(0)
    # B is zero at init (as PEFT's); make it random so that A's gradient is not trivially zero
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * 0.1 if p[-1].key == "lora_b" else x,
        trainer.state.params,
    )
    ids, pixels, mask = ref.inputs(llava.config, batch=3, pad=[0, 2, 4], side="right", suffix=9)
    labels = np.where(mask == 1, ids, train_step.IGNORE_INDEX)
    labels[:, : 3 + ref.image_seq_length(llava.config)] = train_step.IGNORE_INDEX  # score the text after the image
    batch = Batch(input_ids=ids.astype(np.int32), labels=labels.astype(np.int32),
                  attention_mask=mask.astype(np.int32), pixel_values=pixels)
    loss_fn = train_step.make_loss_fn(trainer.graphdef, trainer.template, experiment.train)
    (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, trainer.frozen, batch, None)

    peft = get_peft_model(llava, PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})",
    ))
    layers = params["language_model"]["layers"]
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            layer, group, proj = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-2], name.split(".")[-1]
            ours = layers[group][proj]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(ours["lora_a"][layer]).T))
                module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(ours["lora_b"][layer]).T))
    out = peft(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
               attention_mask=torch.tensor(mask), labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()

    assert int(count) == int((labels[:, 1:] != train_step.IGNORE_INDEX).sum())
    np.testing.assert_allclose(float(loss_sum / count), out.loss.item(), rtol=1e-5)
    checked = 0
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            layer, group, proj = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-2], name.split(".")[-1]
            ours = grads["language_model"]["layers"][group][proj]
            for factor, theirs in (("lora_a", module.lora_A["default"]), ("lora_b", module.lora_B["default"])):
                mine = np.asarray(ours[factor][layer]) / float(count)
                np.testing.assert_allclose(mine, theirs.weight.grad.numpy().T, rtol=2e-4, atol=1e-6,
                                           err_msg=f"{name} {factor}")
                checked += 1
    assert checked == 2 * len(LORA_TARGETS) * llava.config.text_config.num_hidden_layers


@pytest.mark.parametrize("head_trains", [False, True])
def test_loss_skips_unscored_chunks_and_equals_the_full_logits_loss(monkeypatch, head_trains):
    monkeypatch.setattr(train_step, "LOSS_CHUNK_POSITIONS", 16)
    batch, seq, embed, vocab = 3, 70, 8, 50
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((batch, seq, embed)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((embed, vocab)), jnp.float32)
    labels = np.full((batch, seq), train_step.IGNORE_INDEX, np.int32)
    labels[0, 40:47] = rng.integers(0, vocab, 7)  # one answer
    labels[1, 10:13] = rng.integers(0, vocab, 3)  # two turns
    labels[1, 60:70] = rng.integers(0, vocab, 10)
    labels = jnp.asarray(labels)  # row 2 scores nothing

    def expected(hidden, head):
        logits = hidden[:, :-1] @ head
        targets = labels[:, 1:]
        valid = targets != train_step.IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)), jnp.sum(valid)

    calls = []

    def ours(hidden, head):
        return train_step.token_cross_entropy(lambda h: calls.append(h.shape) or h @ head, hidden, labels)

    (loss, count), (want, want_count) = ours(hidden, head), expected(hidden, head)
    assert int(count) == int(want_count) == 20 and calls[-1] == (batch, 16, embed)  # chunks of 16 positions
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    argnums = (0, 1) if head_trains else 0
    grads = jax.jit(jax.grad(lambda h, w: ours(h, w)[0], argnums=argnums))(hidden, head)
    want_grads = jax.grad(lambda h, w: expected(h, w)[0], argnums=argnums)(hidden, head)
    for got, ref_grad in zip(*(jax.tree.leaves(g) for g in (grads, want_grads)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref_grad), rtol=1e-5, atol=1e-6)
    assert not np.asarray(jax.tree.leaves(grads)[0])[2].any()  # the unscored row gets no gradient

    # 13 scored positions at most in a row: only the first of the five chunks is ever computed
    computed = []
    jax.jit(jax.grad(lambda h: train_step.token_cross_entropy(
        lambda x: jax.debug.callback(lambda: computed.append(1)) or x @ head, h, labels)[0]
    ))(hidden).block_until_ready()
    assert len(computed) == 1


# --- configuration: what trains, at which rate, where it lives -------------------------------


def test_trainable_groups_schedules_and_optimizer_state_cover_only_the_trainable_tree():
    experiment = _tiny(steps=100, warmup_ratio=0.1, trainable=EMOLA_TRAINABLE)
    model = EmolaForConditionalGeneration(experiment.model, rngs=nnx.Rngs(0))
    _, template, params, frozen = train_step.split_trainable(model, experiment.train)
    names = {"/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert all(n.startswith(("language_model/layers/", "prior_projector/", "multi_modal_projector/")) for n in names)
    assert any(n.endswith("lora_a") for n in names) and "prior_projector/linear_1/kernel" in names
    frozen_names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    assert not any("lora" in n or n.startswith("prior_projector") for n in frozen_names)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

    optimizer, schedules = train_step.make_optimizer(experiment.train, params)
    assert sorted(schedules) == ["lr=0.0001", "lr=2e-05"]
    opt_leaves = [x for x in jax.tree.leaves(optimizer.init(params)) if np.ndim(x) > 0]
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(params))  # Adam's mu and nu only
    lr = schedules["lr=0.0001"]
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-4)  # 10 warmup steps (ratio 0.1 of 100)
    assert float(lr(55)) == pytest.approx(0.5e-4, rel=1e-5)  # cosine half-way through the decay
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("steps,ratio", [(10, 0.03), (100, 0.03), (7, 0.5), (33, 0.1), (1000, 0.07), (20, 0.0)])
def test_warmup_and_schedules_are_transformers_own(tmp_path, schedule, steps, ratio):
    """The rate of every update as transformers' trainer sets it (the official scripts train with it)."""
    from transformers import TrainingArguments, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to="none").get_warmup_steps(steps)
    config = TrainConfig(steps=steps, warmup_ratio=ratio, schedule=schedule)
    assert train_step.warmup_steps(config) == warmup
    assert (steps, ratio) != (10, 0.03) or warmup == 1  # round() would give no warmup at all
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    if schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    expected = []
    for _ in range(steps):  # the rate the k-th update uses, k = 0 .. steps - 1
        expected.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    ours = train_step._schedule(config, 1e-4)
    # float32 (optax) against float64 (torch): 1e-6 of the peak rate
    np.testing.assert_allclose([float(ours(k)) for k in range(steps)], expected, rtol=0, atol=1e-10)


def _specs(model, mesh) -> dict[str, tuple]:
    """Every weight's mesh placement, from the axes the model declares: `{path: spec}`."""
    axes = logical_axes_table(model)
    _, state = nnx.split(model)
    return {"/".join(map(str, p)): tuple(param_sharding(tuple(map(str, p)), v.get_value().shape, mesh, axes).spec)
            for p, v in nnx.to_flat_state(state)}


# The intended placement of the tiny EmoLA (every size divides by 4) on a (2, 2, 2) mesh: the decoder's
# `embed` over fsdp and `heads`/`mlp`/`vocab` over tensor, the scanned `layers` axis whole. A trainable
# weight whose `embed` axis did not take fsdp (LoRA-B of q/k/v/gate/up, LoRA-A of o/down, the projectors'
# hidden layer) splits its other axis over tensor and fsdp both (ZeRO-3); the vision tower is replicated.
BOTH = ("tensor", "fsdp")
TINY_DECODER_LAYER = {
    "input_layernorm/scale": (None,),
    "post_attention_layernorm/scale": (None,),
    **{f"self_attn/{n}_proj/{w}": spec for n in "qkv" for w, spec in
       {"kernel": ("fsdp", "tensor"), "lora_a": ("fsdp", None), "lora_b": (None, BOTH)}.items()},
    "self_attn/o_proj/kernel": ("tensor", "fsdp"),
    "self_attn/o_proj/lora_a": (BOTH, None),
    "self_attn/o_proj/lora_b": (None, "fsdp"),
    **{f"mlp/{n}_proj/{w}": spec for n in ("gate", "up") for w, spec in
       {"kernel": ("fsdp", "tensor"), "lora_a": ("fsdp", None), "lora_b": (None, BOTH)}.items()},
    "mlp/down_proj/kernel": ("tensor", "fsdp"),
    "mlp/down_proj/lora_a": (BOTH, None),
    "mlp/down_proj/lora_b": (None, "fsdp"),
}
TINY_PROJECTOR = {"linear_1/kernel": (None, BOTH), "linear_1/bias": (BOTH,), "linear_2/kernel": BOTH,
                  "linear_2/bias": ("fsdp",)}
TINY_SPECS = {
    "language_model/embed_tokens/embedding": ("tensor", "fsdp"),
    "language_model/norm/scale": (None,),
    "lm_head/kernel": ("fsdp", "tensor"),
    **{f"language_model/layers/{k}": (None, *v) for k, v in TINY_DECODER_LAYER.items()},
    **{f"{root}/{k}": v for root in ("multi_modal_projector", "prior_projector") for k, v in TINY_PROJECTOR.items()},
}
REPLICATED_ROOTS = ("vision_tower/",)


def test_declared_axes_place_the_tiny_model():
    config = dataclasses.replace(configs.load("tiny").model, lora=LoRAConfig(rank=16, alpha=32.0,
                                                                             targets=LORA_TARGETS))
    model = abstract_model(config)
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = _specs(model, mesh)
    for name, spec in specs.items():
        print(f"{name:55} {spec}")
    replicated = {n: s for n, s in specs.items() if n.startswith(REPLICATED_ROOTS)}
    assert {n for n in replicated if n.startswith("vision_tower/encoder/layers/self_attn/")} >= {
        f"vision_tower/encoder/layers/self_attn/{n}_proj/kernel" for n in "qkv"}
    assert all(s == (None,) * len(s) for s in replicated.values())
    assert {n: s for n, s in specs.items() if n not in replicated} == TINY_SPECS

    # Adam's moments nest the trainable weights' paths under opt_state: they are placed like them.
    train = dataclasses.replace(configs.load("tiny").train, trainable=EMOLA_TRAINABLE)
    _, _, params, _ = train_step.split_trainable(model, train)
    optimizer, _ = train_step.make_optimizer(train, params)
    state = jax.eval_shape(functools.partial(train_step.init_state, optimizer=optimizer, seed=0), params)
    shardings = state_shardings(state, mesh, logical_axes_table(model))
    placed, roots = {}, {name.split("/")[0] for name in specs}
    for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        placed.setdefault(names[0], []).append((names, tuple(sharding.spec)))
    moments = [(n, s) for n, s in placed["opt_state"] if "mu" in n or "nu" in n]
    assert len(moments) == 2 * len(placed["params"])
    for names, spec in placed["params"] + moments:
        weight = "/".join(names[next(i for i, n in enumerate(names) if n in roots):])
        assert spec == specs[weight], weight
    assert any(s != (None,) * len(s) for _, s in moments)  # the LoRA moments are sharded
    assert all(s == () for n, s in placed["opt_state"] if "mu" not in n and "nu" not in n)  # counters
    assert [s for _, s in placed["step"] + placed["rng"]] == [(), ()]


def test_a_weight_without_declared_axes_is_an_error():
    config, mesh = configs.load("tiny").model, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="lm_head/bias is not a weight"):
        param_sharding(("lm_head", "bias"), (512,), mesh, logical_axes_table(abstract_model(config)))
    model = abstract_model(config)
    norm = model.language_model.norm
    norm.scale = nnx.Param(norm.scale.get_value())  # made without axes
    with pytest.raises(ValueError, match="language_model/norm/scale declares no logical axes"):
        logical_axes_table(model)
    model = abstract_model(config)
    model.language_model.layers.self_attn.q_proj.kernel.set_metadata(out_sharding=("embed", "heads"))
    with pytest.raises(ValueError, match="language_model/layers/self_attn/q_proj/kernel declares axes"):
        logical_axes_table(model)  # stacked: three dimensions, two axes


def test_logical_axes_place_the_7b_weights():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    specs = _specs(abstract_model(EmolaConfig(lora=LoRAConfig())), mesh)  # shapes only: the 7B defaults
    assert specs["language_model/layers/self_attn/q_proj/kernel"] == (None, "fsdp", "tensor")  # (32, 4096, 4096)
    assert specs["language_model/layers/mlp/down_proj/lora_b"] == (None, None, "fsdp")  # (32, 128, 4096)
    assert specs["language_model/embed_tokens/embedding"] == ("tensor", "fsdp")  # (32000, 4096)
    # a size the mesh axis does not divide stays whole; the vision tower is replicated
    axes = logical_axes_table(abstract_model(EmolaConfig()))
    embed = ("language_model", "embed_tokens", "embedding")
    assert tuple(partition_spec(axes[embed], (32001, 4096), mesh)) == (None, "fsdp")
    assert specs["vision_tower/encoder/layers/mlp/fc1/kernel"] == (None, None, None)  # (24, 1024, 4096)
    assert specs["vision_tower/encoder/layers/self_attn/q_proj/kernel"] == (None, None, None)
    assert MeshConfig.parse("data=2,tensor=2").shape(8) == (2, 1, 2)
    assert MeshConfig.parse("data=-1,fsdp=4").shape(8) == (2, 4, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        MeshConfig(data=4, fsdp=4).shape(8)


# --- meshes and processes agree ---------------------------------------------------------------


def _steps_on_meshes(out: str) -> None:
    """Runs in a process with 8 CPU devices: 3 steps of the same batches on three meshes."""
    results = {}
    for name, mesh in {"data=1": MeshConfig(data=1), "data=8": MeshConfig(data=8),
                       "data=2,fsdp=2,tensor=2": MeshConfig(data=2, fsdp=2, tensor=2)}.items():
        experiment = _tiny(mesh=mesh, trainable=EMOLA_TRAINABLE)  # EmoLA's learning rates
        trainer = Trainer(experiment)
        loader = SyntheticLoader(experiment.data, trainer.config)
        losses = [float(trainer.step(next_batch(loader, 1))["loss"]) for _ in range(3)]
        params = {"/".join(k.key for k in p): np.asarray(x).tolist()
                  for p, x in jax.tree_util.tree_flatten_with_path(trainer.state.params)[0]}
        results[name] = {"losses": losses, "params": params}
    Path(out).write_text(json.dumps(results))


def test_meshes_agree_after_three_steps(tmp_path):
    out = tmp_path / "meshes.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    script = f"from tests.test_train import _steps_on_meshes; _steps_on_meshes({str(out)!r})"
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True)
    results = json.loads(out.read_text())
    reference = results.pop("data=1")
    for name, result in results.items():
        np.testing.assert_allclose(result["losses"], reference["losses"], atol=1e-5, err_msg=name)
        for key, value in reference["params"].items():
            np.testing.assert_allclose(result["params"][key], value, atol=1e-5, err_msg=f"{name} {key}")


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --- checkpoints, resume, faults --------------------------------------------------------------


def test_resume_after_a_stop_repeats_the_straight_run_bit_for_bit(tmp_path):
    common = ["train", "--config", "tiny", "--steps", "6", "--set", "train.checkpoint_every=3"]
    assert run.main([*common, "--workdir", str(tmp_path / "straight")]) == 0
    assert run.main([*common, "--workdir", str(tmp_path / "resumed"), "--until", "3"]) == 0
    assert len(_losses(tmp_path / "resumed")) == 3 and not (tmp_path / "resumed" / "model").exists()
    assert run.main([*common, "--workdir", str(tmp_path / "resumed")]) == 0
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # to the last bit
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "learning_rate", "tokens_per_second"} <= set(records[0])
    assert any((tmp_path / "straight" / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["3", "6"]


class _PoisonedLoader(SyntheticLoader):
    """Synthetic batches whose second batch has a NaN image."""

    def __next__(self):
        batch = super().__next__()
        if self.index == 2:
            batch = batch.replace(pixel_values=np.full_like(batch.pixel_values, np.nan))
        return batch


def test_a_non_finite_step_is_skipped_or_stops_the_run(tmp_path):
    experiment = _tiny(steps=3, on_nonfinite="skip", checkpoint_every=1)
    trainer = Trainer(experiment)
    loader = _PoisonedLoader(experiment.data, trainer.config)
    trainer.step(next_batch(loader, 1))
    before = jax.tree.map(np.asarray, trainer.state.params)
    metrics = trainer.step(next_batch(loader, 1))
    assert not bool(metrics["finite"]) and int(metrics["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.state.params), before)
    assert bool(trainer.step(next_batch(loader, 1))["finite"])

    stopping = dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, on_nonfinite="stop"))
    with pytest.raises(FloatingPointError, match="step 2: loss nan"):
        train(stopping, tmp_path, progress=False, loader=_PoisonedLoader(experiment.data, trainer.config))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # nothing after the fault


def test_a_host_batch_with_a_wrong_placeholder_count_is_refused_before_the_step():
    experiment = _tiny(steps=1)
    trainer = Trainer(experiment)
    batch = next_batch(SyntheticLoader(experiment.data, trainer.config), 1)  # [accum, rows, seq]
    batch.input_ids[0, 3, 2] = 5  # row 3 loses one of its image placeholders
    expected = trainer.config.image_seq_length
    with pytest.raises(ValueError, match=rf"^row 3 of input_ids holds {expected - 1} image tokens; this model "
                                         rf"expects exactly {expected} per row"):
        trainer.step(batch)
    assert int(trainer.state.step) == 0


def test_a_missing_or_mismatched_base_is_an_error_before_any_compile(tmp_path):
    tiny = configs.load("tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training_config(dataclasses.replace(tiny, train=TrainConfig(base=str(tmp_path / "nothing"))))
    other = tiny.model.replace(text=dataclasses.replace(tiny.model.text, hidden_size=64), lora=None)
    save_pretrained(EmolaForConditionalGeneration(other, rngs=nnx.Rngs(0)), tmp_path / "base")
    with pytest.raises(ValueError, match="text.hidden_size: 64 there, 128 here"):
        training_config(dataclasses.replace(tiny, train=TrainConfig(base=str(tmp_path / "base"))))


def test_the_config_and_the_base_agree_or_the_run_refuses(tmp_path, capsys):
    tiny = configs.load("tiny")
    base_model = tiny.model.replace(lora=None, prior_position="off")
    save_pretrained(EmolaForConditionalGeneration(base_model, rngs=nnx.Rngs(0)), tmp_path / "base")
    with_base = TrainConfig(base=str(tmp_path / "base"))
    # a whole model config: every field but what training adds must be the base's, each difference listed
    changed = tiny.model.replace(image_token_id=-200, text=dataclasses.replace(tiny.model.text, rope_theta=5e5))
    with pytest.raises(ValueError, match=r"text.rope_theta: 10000.0 there, 500000.0 here; image_token_id: 511 there, "
                                         r"-200 here\)"):
        training_config(Experiment(model=changed, train=with_base))
    # what training adds comes from the config, all else from the base
    config, _ = training_config(Experiment(model=tiny.model.replace(dtype="bfloat16"), train=with_base))
    assert config == base_model.replace(lora=tiny.model.lora, prior_position="after", dtype="bfloat16")
    adds = FromBase(lora=LoRAConfig(rank=2, alpha=4.0), prior_position="before")
    assert training_config(Experiment(model=adds, train=with_base))[0] == adds.apply_to(base_model)
    with pytest.raises(ValueError, match="set train.base"):
        training_config(Experiment(model=adds))
    # an override that could have no effect is refused at the command line
    assert run.main(["train", "--config", "demo_faces", "--workdir", str(tmp_path / "run"),
                     "--set", "model.text.rope_theta=500000"]) == 1
    error = capsys.readouterr().err
    assert "unknown config key 'model.text.rope_theta'; valid keys here: lora, prior_position" in error
    assert not (tmp_path / "run").exists()


def test_restoring_over_another_base_is_refused(tmp_path):
    state = {"step": jnp.int32(1), "params": {"w": jnp.ones(3)}}
    saver = TrainCheckpoints(tmp_path, keep=2, base="a", fingerprint="aaaa")
    saver.save(1, state, {"index": 1})
    saver.wait()
    saver.close()
    restorer = TrainCheckpoints(tmp_path, keep=2, base="b", fingerprint="bbbb")
    with pytest.raises(ValueError, match="fingerprint aaaa"):
        restorer.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    same = TrainCheckpoints(tmp_path, keep=2, base="a", fingerprint="aaaa")
    restored, data_state = same.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    assert data_state == {"index": 1} and np.asarray(restored["params"]["w"]).tolist() == [1, 1, 1]


def test_checkpoints_hold_the_tree_they_held_before_the_state_was_typed(tmp_path):
    """Before `TrainState`, a checkpoint saved the state as a dict of these five keys: a `TrainState` is
    written as the same tree, and such a checkpoint restores as a `TrainState`, so earlier runs resume."""
    experiment = _tiny(steps=1)
    trainer = Trainer(experiment)
    trainer.step(next_batch(SyntheticLoader(experiment.data, trainer.config), 1))
    state = trainer.state
    as_dict = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng,
               "skipped": state.skipped}
    trees = {}
    for name, saved in (("dict", as_dict), ("typed", state)):
        with TrainCheckpoints(tmp_path / name, keep=1, base=None, fingerprint=None) as checkpoints:
            checkpoints.save(1, saved, {"index": 1})
            checkpoints.wait()
        metadata = tmp_path / name / "checkpoints" / "1" / "state" / "_METADATA"
        trees[name] = json.loads(metadata.read_text())["tree_metadata"]
    assert trees["typed"] == trees["dict"]
    assert {leaf["key_metadata"][0]["key"] for leaf in trees["typed"].values()} == {
        "step", "params", "opt_state", "rng", "skipped"}
    with TrainCheckpoints(tmp_path / "dict", keep=1, base=None, fingerprint=None) as checkpoints:
        restored, data_state = checkpoints.restore(abstract_like(state))
    assert isinstance(restored, train_step.TrainState) and data_state == {"index": 1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
