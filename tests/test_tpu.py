"""TPU pods from this machine: the splash-attention kernel's numbers (Pallas interpret mode), meshes
laid on real TPU topologies, every trainable weight sharded under fsdp, and the real train step
compiled for v5e slices by libtpu's compile-only client (nothing runs on a TPU)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils

import configs
from emola_jax import plan
from emola_jax.config import EmolaConfig, LoRAConfig
from emola_jax.models.llama import causal_blockwise_attention
from emola_jax.models.splash import splash_attention
from emola_jax.models.tree import abstract_model
from emola_jax.sharding import MeshConfig, logical_axes_table, make_mesh, state_shardings
from emola_jax.train import step as train_step
from emola_jax.train.config import EMOLA_TRAINABLE

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("libtpu", reason="the TPU compiler (pip install 'jax[tpu]'), in the dev extra")


def _devices(topology: str, slices: int = 1):
    return plan.target(topology, slices).devices


# --- the splash kernel against XLA's attention --------------------------------------------------


def _qkv(batch=2, seq=200, heads=4, kv_heads=2, head_dim=32, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    return q, k, v


def _splash(q, k, v, key_valid=None):
    return splash_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), key_valid)


def test_splash_matches_xla_attention_forward_and_gradients():
    """Causal, grouped-query (4 heads over 2 KV heads), a sequence that is no multiple of the
    kernel's 128-wide blocks. float32: outputs within 1e-5, gradients within 1e-5 of XLA's."""
    q, k, v = _qkv()
    reference = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    np.testing.assert_allclose(_splash(q, k, v), reference(q, k, v), atol=1e-5, rtol=0)
    weights = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))

    def grads(attention):
        return jax.grad(lambda *x: jnp.sum(attention(*x) * weights), argnums=(0, 1, 2))(q, k, v)

    for ours, theirs in zip(grads(_splash), grads(reference), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_splash_bf16_within_bf16_rounding():
    """bfloat16 inputs: within 2e-2 of XLA's float32 attention of the same bf16 values (a few
    bf16 ulps at values near 1; both round the softmax's output to bf16)."""
    q, k, v = _qkv(dtype=jnp.bfloat16)
    exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
    out = _splash(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=2e-2, rtol=0)


def test_splash_with_padding_equals_the_blockwise_prefill():
    """Left-padded prompts (prefill): each real query sees the real keys up to itself only."""
    q, k, v = _qkv()
    valid = jnp.arange(q.shape[1])[None] >= jnp.array([[0], [37]])  # row 1: 37 padding tokens first
    ours = _splash(q, k, v, valid)
    theirs = causal_blockwise_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), valid)
    real = np.asarray(valid)[..., None, None]
    np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, theirs, 0), atol=1e-5, rtol=0)


def test_auto_attention_is_splash_on_tpu():
    from emola_jax.models.llama import resolve_attention

    assert resolve_attention("auto", jnp.bfloat16, "tpu") == "splash"
    assert resolve_attention("auto", jnp.float32, "cpu") == "blockwise"


# --- meshes on the machine's topology ---------------------------------------------------------


@pytest.mark.parametrize("topology, mesh, differs_from_id_order", [
    ("v5e:4x4", MeshConfig(data=2, fsdp=8), True),
    ("v4:2x2x2", MeshConfig(data=2, fsdp=2, tensor=2), False),
    ("v5p:2x2x4", MeshConfig(data=1, fsdp=-1, tensor=2), True),
])
def test_mesh_follows_the_torus(topology, mesh, differs_from_id_order):
    devices = _devices(topology)
    built = make_mesh(mesh, devices)
    expected = mesh_utils.create_device_mesh(mesh.shape(len(devices)), devices, allow_split_physical_axes=True)
    assert built.axis_names == ("data", "fsdp", "tensor")
    assert [d.id for d in built.devices.flat] == [d.id for d in expected.flat]
    # where the torus puts chips out of id order, so does the mesh (devices sorted by id would not)
    assert ([d.id for d in built.devices.flat] != sorted(d.id for d in devices)) == differs_from_id_order


def test_mesh_across_slices_puts_dcn_outside():
    devices = _devices("v5e:2x2", slices=2)
    mesh = MeshConfig(data=1, fsdp=4, dcn_data=2)
    built = make_mesh(mesh, devices)
    expected = mesh_utils.create_hybrid_device_mesh((1, 4, 1), (2, 1, 1), devices, allow_split_physical_axes=True)
    assert dict(built.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [d.id for d in built.devices.flat] == [d.id for d in expected.flat]
    for row in built.devices[:, :, 0]:  # each fsdp group is one slice
        assert len({d.slice_index for d in row}) == 1
    with pytest.raises(ValueError, match="span 2 slice"):
        make_mesh(MeshConfig(data=1, fsdp=-1), devices)
    with pytest.raises(ValueError, match="takes every device"):
        make_mesh(MeshConfig(data=1, fsdp=2), _devices("v5e:2x2"))


# --- everything trainable sharded under fsdp ---------------------------------------------------

# Per-chip shard shapes of the 7B's trainable weights under fsdp=F (F divides every split size):
# each weight is split over fsdp along exactly one axis.
SEVEN_B_SPLIT = {  # path (without the layer index) -> (full shape, split axis)
    **{f"language_model/layers/self_attn/{p}/lora_a": ((32, 4096, 128), 1) for p in ("q_proj", "k_proj", "v_proj")},
    **{f"language_model/layers/self_attn/{p}/lora_b": ((32, 128, 4096), 2) for p in ("q_proj", "k_proj", "v_proj")},
    "language_model/layers/self_attn/o_proj/lora_a": ((32, 4096, 128), 1),
    "language_model/layers/self_attn/o_proj/lora_b": ((32, 128, 4096), 2),
    **{f"language_model/layers/mlp/{p}/lora_a": ((32, 4096, 128), 1) for p in ("gate_proj", "up_proj")},
    **{f"language_model/layers/mlp/{p}/lora_b": ((32, 128, 11008), 2) for p in ("gate_proj", "up_proj")},
    "language_model/layers/mlp/down_proj/lora_a": ((32, 11008, 128), 1),
    "language_model/layers/mlp/down_proj/lora_b": ((32, 128, 4096), 2),
    "multi_modal_projector/linear_1/kernel": ((1024, 4096), 1),
    "multi_modal_projector/linear_1/bias": ((4096,), 0),
    "multi_modal_projector/linear_2/kernel": ((4096, 4096), 1),
    "multi_modal_projector/linear_2/bias": ((4096,), 0),
    "prior_projector/linear_1/kernel": ((212, 4096), 1),
    "prior_projector/linear_1/bias": ((4096,), 0),
    "prior_projector/linear_2/kernel": ((4096, 4096), 1),
    "prior_projector/linear_2/bias": ((4096,), 0),
}


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


@pytest.mark.parametrize("topology, fsdp", [("v5e:2x2", 4), ("v5e:2x4", 8)])
def test_every_trainable_weight_and_moment_is_split_over_fsdp(topology, fsdp):
    model = abstract_model(EmolaConfig(lora=LoRAConfig(), dtype="bfloat16"))
    axes = logical_axes_table(model)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1), _devices(topology))
    train = configs.load("emola_7b").train
    _, _, params, _ = train_step.split_trainable(model, train)
    optimizer, _ = train_step.make_optimizer(train, params)
    state = jax.eval_shape(functools.partial(train_step.init_state, optimizer=optimizer, seed=0), params)
    shardings = state_shardings(state, mesh, axes)
    seen = {}
    for (path, leaf), (_, sharding) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                           jax.tree_util.tree_flatten_with_path(shardings)[0], strict=True):
        names = _names(path)
        start = next((i for i, n in enumerate(names) if n in {p[0] for p in axes}), None)
        if start is None:
            continue  # step counters, the RNG key
        weight = "/".join(names[start:])
        full, axis = SEVEN_B_SPLIT[weight]
        assert leaf.shape == full, weight
        expected = tuple(size // fsdp if i == axis else size for i, size in enumerate(full))
        assert sharding.shard_shape(leaf.shape) == expected, weight
        seen.setdefault(weight, 0)
        seen[weight] += 1
    assert set(seen) == set(SEVEN_B_SPLIT)
    assert set(seen.values()) == {3}  # the master weight and Adam's two moments
    per_chip = plan.bytes_per_chip(state.params, shardings.params) + \
        plan.bytes_per_chip(state.opt_state, shardings.opt_state)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    assert per_chip * fsdp == pytest.approx(whole, rel=1e-6)  # counters are the only whole leaves


# --- the tiny EmoLA's train step compiled for v5e ----------------------------------------------


def _tiny_experiment(mesh: MeshConfig):
    experiment = configs.load("tiny")
    return dataclasses.replace(experiment, train=dataclasses.replace(
        experiment.train, mesh=mesh, trainable=EMOLA_TRAINABLE, remat="full", attention="auto"))


def _compiled_step(experiment, devices, batch_per_chip=2, seq=256):
    program = plan.compile_train(experiment, plan.Target("test", tuple(devices), plan.CHIPS["v5e"]), batch_per_chip,
                                 seq)
    assert program.model.language_model.layers.self_attn.implementation == "splash"
    assert program.refusal is None
    return program.compiled, program.args, program.args[0], program.mesh


@pytest.mark.parametrize("slices", [1, 2])
def test_tiny_step_compiled_for_v5e_places_every_array_as_intended(slices):
    devices = _devices("v5e:2x2", slices)
    mesh_config = MeshConfig(data=1, fsdp=4, dcn_data=slices)
    compiled, args, state, mesh = _compiled_step(_tiny_experiment(mesh_config), devices)
    assert dict(mesh.shape) == {"data": slices, "fsdp": 4, "tensor": 1}
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the splash kernel, compiled for the TPU
    # every input arrives on each chip with the shard shape the sharding table intends
    intended = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(args)]
    compiled_shardings = jax.tree.leaves(compiled.input_shardings[0])
    assert [s.shard_shape(x.shape) for s, x in zip(compiled_shardings, jax.tree.leaves(args), strict=True)] \
        == intended
    # the LoRA factors, projectors and Adam moments: split over fsdp (a quarter on each chip)
    for path, leaf in jax.tree_util.tree_flatten_with_path(args[0])[0]:
        names = _names(path)
        if names[0] in ("params", "opt_state") and leaf.ndim and leaf.size >= 4 * 16:
            assert math.prod(leaf.sharding.shard_shape(leaf.shape)) * 4 == leaf.size, "/".join(names)
    # the frozen base is an input only: the outputs are the new state and the metrics
    out_state, metrics = compiled.out_info
    assert jax.tree.structure(out_state) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    # the per-chip argument bytes are the sum over the shard shapes, in the TPU's tiled layouts
    expected = plan.placed_bytes(args, compiled.input_formats[0])
    assert compiled.memory_analysis().argument_size_in_bytes == expected
    assert expected > plan.bytes_per_chip(args, jax.tree.map(lambda x: x.sharding, args))  # rank 16 pads to 128


def _collectives(hlo: str) -> tuple[int, list[list[int]], int]:
    """`(partitions, ICI replica groups, DCN all-gathers)` of a compiled TPU module. A multi-slice
    module is one slice's program: its ICI collectives group that slice's chips (`num_partitions`),
    and what crosses slices goes through the megascale runtime's sends over DCN."""
    partitions = int(re.search(r"num_partitions=(\d+)", hlo).group(1))
    groups = [[int(i) for i in g.split(",")] for text in re.findall(r"replica_groups=\{(\{[\d,{}]*\})\}", hlo)
              for g in re.findall(r"\{([\d,]+)\}", text)]
    assert "replica_groups=[" not in hlo  # the iota form, not read here
    dcn_gathers = len(re.findall(r' send\(.*_xla_megascale_transfer_type="ALL_GATHER"', hlo))
    return partitions, groups, dcn_gathers


def test_fsdp_collectives_stay_inside_a_slice():
    """Two v5e slices, data parallel across them, fsdp inside: every weight gather and gradient
    reduction groups chips of one slice; over DCN go the gradients' all-reduce and a few small
    activation gathers. With fsdp spread over the slices, the weights' gathers cross DCN."""
    devices = _devices("v5e:2x2", 2)
    inside, *_ = _compiled_step(_tiny_experiment(MeshConfig(data=1, fsdp=4, dcn_data=2)), devices)
    partitions, groups, dcn_gathers = _collectives(inside.as_text())
    assert partitions == 4 and groups
    assert all(set(g) <= set(range(4)) for g in groups)
    assert 'megascale_transfer_type="ALL_REDUCE"' in inside.as_text()  # data parallelism over DCN
    across, *_ = _compiled_step(_tiny_experiment(MeshConfig(data=1, fsdp=4, dcn_fsdp=2)), devices)
    assert _collectives(across.as_text())[2] > dcn_gathers + 10


# --- run.py plan -------------------------------------------------------------------------------


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_run_plan_for_a_v5e_slice_through_run_py():
    result = _run("plan", "--config", "tiny", "--topology", "v5e-4", "--mesh", "data=1,fsdp=-1", "--batch", "2",
                  "--seq", "256", "--max-batch", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "v5e-4: 4 x TPU v5e (16 GiB HBM, 15.75 usable" in out
    total = re.search(r"total +([\d.]+) [GM]iB of 15.75 GiB usable: fits", out)
    assert total and float(total.group(1)) > 0
    assert re.search(r"FLOPs per step +[\d.]+e\+\d+", out)
    assert re.search(r"roofline +[\d.]+ ms", out)
    assert "largest batch that fits: 4 row(s) x 256 tokens per chip" in out  # the search stops at --max-batch
    assert "not a timing" in out
    assert "TPU_ACCELERATOR_TYPE" not in result.stdout + result.stderr  # libtpu's warnings are silenced


def test_run_plan_evaluate_and_cpu_through_run_py():
    result = _run("plan", "--config", "tiny", "--topology", "v5e:2x2", "--evaluate", "--batch", "1",
                  "--prompt-length", "64", "--new-tokens", "8", "--no-search")
    assert result.returncode == 0, result.stderr
    assert "generate step (prefill 64 + 8 new tokens)" in result.stdout
    assert re.search(r"total +[\d.]+ [GM]iB of 15.75 GiB usable: fits", result.stdout)
    result = _run("plan", "--config", "tiny", "--topology", "cpu", "--device-gib", "1", "--no-search",
                  "--seq", "64", "--batch", "1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"total +[\d.]+ [GM]iB of 1 GiB: fits", result.stdout)
    assert "XLA:CPU's plan" in result.stdout


def test_plan_refuses_unknown_topologies_lone_options_and_missing_libtpu(monkeypatch):
    result = _run("plan", "--topology", "v9z-8")
    assert result.returncode == 1
    assert "topology 'v9z-8' is unknown" in result.stderr
    result = _run("plan", "--topology", "v5e-8", "--new-tokens", "8")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: --prompt-length and --new-tokens go with --evaluate (training plans "
                                     "take --seq)")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install 'jax\[tpu\]=="):
        plan.target("v5e-8")


def test_largest_batch_search():
    assert plan.largest_batch(lambda rows: rows <= 11, 64) == 11
    assert plan.largest_batch(lambda rows: rows <= 100, 64) == 64
    assert plan.largest_batch(lambda rows: False, 64) == 0


def test_cloud_names_map_to_topologies():
    assert plan._parse_topology("v5e-8") == ("v5e", 8, "2x4")
    assert plan._parse_topology("v5e-1") == ("v5e", 1, "2x2")
    assert plan._parse_topology("v4-8") == ("v4", 4, "2x2x1")
    assert plan._parse_topology("v5p:2x2x2") == ("v5p", 8, "2x2x2")
    assert len(_devices("v5e-1")) == 1 and len(_devices("v4-8")) == 4 and len(_devices("v5e-256")) == 256


def test_a_refusal_reads_as_what_the_step_needs():
    """The TPU compiler's own sentence for a step that cannot fit (7B LoRA, 4 x 2048, one v5e chip)."""
    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(22.72G) exceeds available HBM (15.75G).")
    assert plan._refused_need(refusal) == int(22.72 * 2**30)
    result = plan._plan(None, refusal, 4, 2 << 30, 1 << 30, {})
    assert result.total == 3 * 2**30 + int(22.72 * 2**30) and not result.fits(plan.CHIPS["v5e"])
    assert "needs at least 25.72 GiB per chip" in "\n".join(plan.describe(result, plan.Target("t", (), None), what="x"))


@pytest.mark.parametrize("topology, generation", [("v4-8", "v4"), ("v5e-1", "v5e"), ("v5p-8", "v5p"), ("v6e-8", "v6e")])
def test_usable_hbm_is_what_the_compiler_allows(topology, generation):
    """A program needing 298 GiB of temporaries is refused by each chip's compiler, naming the HBM
    it allows: the figure a plan's total is held against."""
    target = plan.target(topology)
    mesh = jax.sharding.Mesh([target.devices[0]], ("x",))
    x = jax.ShapeDtypeStruct((200_000,), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    compiled, refusal = plan._compile(lambda v: jnp.sort(v[:, None] * v[None, :], axis=0)[::7].sum(0), (x,), mesh)
    assert compiled is None
    available = re.search(r"exceeds available HBM \(([\d.]+)G\)", refusal)
    assert float(available.group(1)) == plan.CHIPS[generation].usable_gib
