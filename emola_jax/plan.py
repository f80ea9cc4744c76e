"""Before renting a pod: the real train or generate step compiled for a TPU topology, on any machine.

libtpu's compile-only client compiles for a TPU topology that exists only as a description
(`jax.experimental.topologies.get_topology_desc`, as MaxText's `train_compile.py` does): nothing
runs, nothing is allocated. The TPU compiler's memory plan says what a chip holds (weights,
optimiser state, temporaries; a step that cannot fit is refused by the compiler itself). FLOPs and
HBM traffic are counted from the model's shapes (`step_cost`: XLA's cost analysis counts a loop's
body once), and a roofline time follows from the chip's published peaks. This is a compiler plan,
not a timing: collectives, host input and the kernels' real efficiency are not in it.
`topology="cpu"` plans for this machine's CPU devices instead (XLA:CPU's plan, which upcasts bf16
matmul operands to float32 and keeps NF4 codes a byte each: an upper bound for an accelerator).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from emola_jax.config import EmolaConfig
from emola_jax.data.pipeline import Batch
from emola_jax.generate import GenerationConfig, generate_step
from emola_jax.models.tree import abstract_model, quantize_model
from emola_jax.quantization import Quantization
from emola_jax.sharding import MeshConfig, batch_sharding, logical_axes_table, make_mesh, state_shardings
from emola_jax.train import step as train_step
from emola_jax.train.config import Experiment, planned_model

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures (HBM, peak dense bf16 FLOP/s, HBM bandwidth) and the HBM
    the TPU compiler lets a program use (`usable_gib`, what it names in its out-of-memory refusal)."""

    name: str
    hbm_gib: float
    usable_gib: float
    peak_flops: float
    hbm_bandwidth: float  # bytes/s
    source: str


# Published figures: Google Cloud's TPU system-architecture pages, per chip (v4 and v5p: both
# TensorCores of a chip, one jax device in megacore mode). Usable HBM: libtpu 0.0.42's refusals.
CHIPS = {
    "v4": Chip("TPU v4", 32, 30.75, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16, 15.75, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95, 95.74, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 32, 31.25, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# Cloud names (`v5e-8`: chips for v5e/v6e, TensorCores for v4/v5p) -> jax topology shapes
_CHIP_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_CHIP_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                  512: "8x8x8"}
_MEGACORE = ("v4", "v5p")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan compiles for: the devices, and the chip whose figures the roofline uses
    (None for this machine's CPU)."""

    name: str
    devices: tuple
    chip: Chip | None


def target(topology: str, num_slices: int = 1) -> Target:
    """`cpu` (this machine's devices), a jax topology name (`v5e:2x2`, `v4:2x2x1`) or a Cloud
    name (`v5e-8`, `v5p-8`, `v5e-1`: one chip of a 2x2 slice). Raises ValueError for an unknown
    name, RuntimeError (saying how to install it) where libtpu is missing."""
    if topology == "cpu":
        if num_slices != 1:
            raise ValueError("--num-slices goes with a TPU topology, not cpu")
        return Target("cpu", tuple(jax.devices("cpu")), None)
    generation, chips, grid = _parse_topology(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"planning for {topology} needs libtpu, the TPU compiler: pip install "
                           f"'jax[tpu]=={jax.__version__}' (it runs without a TPU)")

    # libtpu reads these to find the machine it runs on; a compile-only client has none, and
    # without them it prints warnings about a missing accelerator type and worker hostnames
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: plans may run side by side
    kwargs = {"chip_config_name": "megacore"} if generation in _MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    description = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{grid}", **kwargs)
    devices = tuple(description.devices)
    if chips == 1:  # libtpu refuses a 1x1 topology: one chip is one device of a 2x2 slice
        devices = devices[:1]
    suffix = f" x {num_slices} slices" if num_slices > 1 else ""
    return Target(f"{topology}{suffix}", devices, CHIPS[generation])


def _parse_topology(topology: str) -> tuple[str, int, str]:
    """`(generation, chips per slice, grid)` of `v5e:2x4` or `v5e-8`."""
    known = ", ".join(CHIPS)
    match = re.fullmatch(r"(v\d+[a-z]?)(?::(\d+(?:x\d+)+)|-(\d+))", topology)
    if not match or match.group(1) not in CHIPS:
        raise ValueError(f"topology {topology!r} is unknown: give cpu, GEN:AxB[xC] (jax's names, e.g. v5e:2x2, "
                         f"v4:2x2x1) or GEN-N (Cloud's names, e.g. v5e-8, v5p-8) with GEN one of {known}")
    generation, grid, cloud = match.groups()
    three_d = generation in _MEGACORE
    if grid is not None:
        if len(grid.split("x")) != (3 if three_d else 2):
            raise ValueError(f"topology {topology!r}: {generation} slices are {'AxBxC' if three_d else 'AxB'}")
        return generation, math.prod(map(int, grid.split("x"))), grid
    chips = int(cloud) // 2 if three_d else int(cloud)  # v4-8 / v5p-8 count TensorCores: 4 chips
    grids = _CHIP_GRIDS_3D if three_d else _CHIP_GRIDS_2D
    if chips == 1 and not three_d:
        return generation, 1, grids[4]
    if chips not in grids:
        sizes = ", ".join(f"{generation}-{n * 2 if three_d else n}" for n in grids)
        raise ValueError(f"topology {topology!r}: Cloud sizes known here are {sizes}; or give jax's GEN:AxB form")
    return generation, chips, grids[chips]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-chip figures of one compiled step (bytes, FLOPs); `refused` holds the compiler's own
    sentence where it could not fit the step in HBM (the temporaries are then the ones it names,
    the weights and optimiser state counted from their shapes)."""

    batch: int  # rows per chip
    weights: int  # frozen base + trainable master weights
    optimizer: int  # optimiser state (Adam moments)
    arguments: int  # all inputs, the batch included
    temporaries: int
    total: int  # arguments + outputs not aliased to donated inputs + temporaries
    flops: float = 0.0  # what the chip computes (rematerialisation included): `step_cost`
    model_flops: float = 0.0  # what the step needs (PaLM's MFU numerator: no rematerialisation)
    hbm_bytes: float = 0.0  # weights, optimiser state and saved activations read and written
    host: int = 0  # the host's pinned memory the step uses (remat=offload's layer inputs)
    refused: str | None = None

    def fits(self, chip: Chip | None, device_gib: float | None = None) -> bool:
        capacity = capacity_gib(chip, device_gib)
        return self.refused is None and (capacity is None or self.total <= capacity * GIB)

    def roofline(self, chip: Chip) -> tuple[float, str, float]:
        """`(seconds, bound, mfu)`: the step's time if it ran at the chip's peak FLOP/s or HBM
        bandwidth, whichever binds ("compute" or "HBM"), and the model FLOP utilisation then."""
        compute, memory = self.flops / chip.peak_flops, self.hbm_bytes / chip.hbm_bandwidth
        seconds = max(compute, memory)
        mfu = self.model_flops / (seconds * chip.peak_flops) if seconds else 0.0
        return seconds, "compute" if compute >= memory else "HBM", mfu


def capacity_gib(chip: Chip | None, device_gib: float | None = None) -> float | None:
    """The memory a plan must fit in: `device_gib` where given, else what the chip's compiler allows."""
    return device_gib if device_gib is not None else (chip.usable_gib if chip else None)


def bytes_per_chip(tree, shardings) -> int:
    """What the leaves of `tree` (abstract arrays) occupy on one device under `shardings`; 4-bit
    codes count half a byte each, as a TPU packs them."""
    leaves, tree_def = jax.tree.flatten(tree)
    return sum(math.prod(s.shard_shape(x.shape)) * _bits(x.dtype) // 8
               for x, s in zip(leaves, tree_def.flatten_up_to(shardings), strict=True))


def placed_bytes(tree, formats) -> int:
    """What the leaves of `tree` occupy on one device in the layouts a compiled step chose for
    them (`compiled.input_formats`): on a TPU, arrays are stored in tiles (`(8, 128)` for
    float32), so a small minor dimension is padded, e.g. rank-8 LoRA factors laid out rank-minor."""
    leaves, tree_def = jax.tree.flatten(tree)
    return sum(tiled_bytes(f.sharding.shard_shape(x.shape), x.dtype, f.layout)
               for x, f in zip(leaves, tree_def.flatten_up_to(formats), strict=True))


def tiled_bytes(shape: Sequence[int], dtype, layout) -> int:
    """Bytes of an array of `shape` stored in `layout` (its dimensions in `major_to_minor` order,
    the minor ones padded to the layout's first tile; XLA's tiled layouts)."""
    if layout is None or not layout.tiling:
        return math.prod(shape) * _bits(dtype) // 8
    dims = [shape[i] for i in layout.major_to_minor]
    tile = layout.tiling[0]
    dims = [1] * (len(tile) - len(dims)) + dims
    for k, size in enumerate(tile):
        i = len(dims) - len(tile) + k
        dims[i] = -(-dims[i] // size) * size
    return math.prod(dims) * _bits(dtype) // 8


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return dtype.itemsize * 8


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _compile(fn: Callable, args: Sequence, mesh, **jit_kwargs):
    """Lowers and compiles under `mesh` (kernels that need the mesh read it from there); returns
    `(compiled, None)` or `(None, the compiler's refusal)` when the step does not fit in memory.
    Inputs the step never reads (CLIP's last layer and norm, under LLaVA's second-to-last-layer
    features) are kept: a run loads them, so they occupy the chip."""
    try:
        with jax.set_mesh(mesh):
            return jax.jit(fn, keep_unused=True, **jit_kwargs).lower(*args).compile(), None
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        text = str(err)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        return None, " ".join(text.split())


# "... the total memory required for HLO temporaries (22.72G) exceeds available HBM (15.75G)."
_REFUSAL = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def _refused_need(refusal: str) -> int:
    """The bytes the compiler's refusal says the step needs beyond the arguments (0 when it names none)."""
    match = _REFUSAL.search(refusal)
    if not match:
        return 0
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def _plan(compiled, refusal: str | None, batch: int, weights: int, optimizer: int, cost: dict) -> Plan:
    if compiled is None:
        need = _refused_need(refusal)
        return Plan(batch, weights, optimizer, 0, need, weights + optimizer + need, refused=refusal, **cost)
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    host = (memory.host_argument_size_in_bytes + memory.host_output_size_in_bytes - memory.host_alias_size_in_bytes
            + memory.host_temp_size_in_bytes)
    return Plan(batch, weights, optimizer, memory.argument_size_in_bytes, memory.temp_size_in_bytes, total,
                host=host, **cost)


def step_cost(config: EmolaConfig, rows: int, seq: int, *, remat: str | None, new_tokens: int = 0,
              weight_bytes: int = 0, trainable_bytes: int = 0) -> dict[str, float]:
    """Per-chip FLOPs and HBM traffic of a step over `rows` rows of `seq` tokens, counted from the
    model's shapes, as MaxText counts its TFLOPs. XLA's own cost analysis counts the body of a loop
    once, and the decoder is a scan over its layers (the decode loop a while loop), so it
    undercounts these steps many times over; Pallas kernels carry no cost at all.

    Matmuls: 2 FLOPs per weight per token; causal attention `2 * seq^2 * head_dim` per head and
    row, CLIP's full attention twice that; the head over every position (an upper bound: the loss
    skips chunks with no scored token). Training (`remat` given): the frozen weights' backward pass
    makes input gradients only (1x the forward), LoRA's makes input and weight gradients (2x),
    attention's recomputes its scores (2.5x, FlashAttention's count); full (or offloaded) remat runs
    the decoder's forward twice, which `model_flops` leaves out. HBM traffic: the decoder's weights
    read once per pass (`weight_bytes`, as gathered on the chip), the trainable state read and
    written by the optimiser (8 x `trainable_bytes`, the master copy's bytes on the chip: the
    copy, its gradient and two moments, each read and written), and the saved
    layer inputs; activations that stay in on-chip memory are not counted (a lower bound).
    Generation (`new_tokens`): a prefill of `seq` tokens, then per new token the decoder's weights
    and the KV cache read once.
    """
    text, vision = config.text, config.vision
    layers, heads, head_dim = text.num_hidden_layers, text.num_attention_heads, text.resolved_head_dim
    matmul = 2.0 * decoder_matmul_params(config)
    lora = 2.0 * (decoder_matmul_params(config) - decoder_matmul_params(config.replace(lora=None)))
    attention = 2.0 * heads * seq * seq * head_dim * layers  # per row, causal
    head = 2.0 * text.hidden_size * text.vocab_size
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    vision_layer = 2.0 * (4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size)
    image = (config.visual_tokens * (patches * vision_layer * config.vision_layers_used
             + 4.0 * vision.num_attention_heads * patches**2 * (vision.hidden_size // vision.num_attention_heads)
             * config.vision_layers_used
             + 2.0 * (vision.hidden_size + text.hidden_size) * text.hidden_size * config.num_visual_tokens))
    tokens = rows * seq
    forward = tokens * (matmul + head) + rows * (attention + image)
    if new_tokens:  # generation: prefill, then one token at a time over a growing cache
        context = seq + new_tokens / 2
        decode = rows * new_tokens * (matmul + head + 4.0 * heads * context * head_dim * layers)
        cache = 2.0 * rows * layers * text.num_key_value_heads * head_dim * context * 2  # bf16 keys and values
        return {"flops": forward + decode, "model_flops": forward + decode,
                "hbm_bytes": (1 + new_tokens) * weight_bytes + new_tokens * cache}
    backward = tokens * (matmul + lora + head) + rows * 2.5 * attention
    recompute = tokens * matmul + rows * attention if remat in ("full", "offload") else 0.0
    passes = 3 if recompute else 2
    saved = 2.0 * tokens * text.hidden_size * layers * 2  # bf16 layer inputs, written and read
    return {"flops": forward + backward + recompute, "model_flops": forward + backward,
            "hbm_bytes": passes * weight_bytes + 8 * trainable_bytes + saved}


def model_for(experiment: Experiment, target_: Target, quantization: Quantization | None):
    """The abstract model of `experiment` with attention resolved for the target's platform and
    the frozen decoder kernels quantised where asked."""
    config = planned_model(experiment.model)
    model = abstract_model(config)
    model.language_model.set_attention(experiment.train.attention, target_.devices[0].platform)
    axes = logical_axes_table(model)  # before quantising: a QArray's codes and scales follow their kernel's axes
    if quantization is not None:
        quantize_model(model, quantization)
    return model, config, axes


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """A train step compiled for a target: `compiled` (None where the compiler refused it, with
    its sentence in `refusal`), the abstract placed arguments `(state, frozen, batch)`, the mesh."""

    compiled: object | None
    refusal: str | None
    args: tuple
    mesh: object
    config: EmolaConfig
    model: object


def compile_train(experiment: Experiment, target_: Target, batch_per_chip: int, seq: int) -> TrainProgram:
    """The train step of `experiment` (its `train.*` settings: mesh, remat, attention,
    base_quantization) at `batch_per_chip` rows of `seq` tokens, compiled for `target_`, with
    the state donated and the frozen base an input only, as `Trainer` jits it."""
    cfg = experiment.train
    quantization = Quantization.of(cfg.base_quantization, cfg.quantization_block_size)
    model, config, axes = model_for(experiment, target_, quantization)
    mesh = make_mesh(cfg.mesh, target_.devices)
    graphdef, template, params, frozen = train_step.split_trainable(model, cfg)
    optimizer, _ = train_step.make_optimizer(cfg, params)
    state = jax.eval_shape(functools.partial(train_step.init_state, optimizer=optimizer, seed=0), params)
    state_sharding = state_shardings(state, mesh, axes)
    batch = train_batch(config, batch_per_chip * mesh.shape["data"] * mesh.shape["fsdp"], seq, mesh)
    args = (_abstract(state, state_sharding), _abstract(frozen, state_shardings(frozen, mesh, axes)), batch)
    step = train_step.make_train_step(graphdef, template, optimizer, cfg)
    compiled, refusal = _compile(step, args, mesh, donate_argnums=(0,),
                                 out_shardings=(state_sharding, NamedSharding(mesh, PartitionSpec())))
    return TrainProgram(compiled, refusal, args, mesh, config, model)


def plan_train(experiment: Experiment, target_: Target, batch_per_chip: int, seq: int) -> Plan:
    """`compile_train`'s step as a `Plan`: its bytes per chip, in the layouts the compiler chose
    (by shard shapes where it refused the step), and its cost."""
    program = compile_train(experiment, target_, batch_per_chip, seq)
    state, frozen, _ = program.args
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    if program.compiled is not None:
        state_formats, frozen_formats, _ = program.compiled.input_formats[0]
        weights = placed_bytes(frozen, frozen_formats) + placed_bytes(state.params, state_formats.params)
        optimizer_bytes = placed_bytes(state.opt_state, state_formats.opt_state)
    else:
        weights = (bytes_per_chip(frozen, shardings(frozen))
                   + bytes_per_chip(state.params, shardings(state.params)))
        optimizer_bytes = bytes_per_chip(state.opt_state, shardings(state.opt_state))
    mesh = program.mesh
    gathered = bytes_per_chip(frozen, jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), frozen))
    cost = step_cost(program.config, batch_per_chip, seq, remat=experiment.train.remat,
                     weight_bytes=gathered // mesh.shape["tensor"],
                     trainable_bytes=bytes_per_chip(state.params, shardings(state.params)))
    return _plan(program.compiled, program.refusal, batch_per_chip, weights, optimizer_bytes, cost)


def train_batch(config: EmolaConfig, rows: int, seq: int, mesh) -> Batch:
    """The abstract `[accum=1, rows, ...]` batch of a train step, rows split over the batch axes."""
    def rows_of(*shape: int, dtype=jnp.int32) -> jax.ShapeDtypeStruct:
        sharding = NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, 1 + len(shape)).spec))
        return jax.ShapeDtypeStruct((1, rows, *shape), dtype, sharding=sharding)

    size = config.vision.image_size
    return Batch(input_ids=rows_of(seq), labels=rows_of(seq), attention_mask=rows_of(seq),
                 pixel_values=rows_of(size, size, 3, dtype=jnp.float32),
                 landmarks=rows_of(config.prior_dim, dtype=jnp.float32) if config.prior_position != "off" else None)


def plan_generate(experiment: Experiment, target_: Target, batch_per_chip: int, prompt: int,
                  max_new_tokens: int) -> Plan:
    """Evaluation's generate step (prefill + the decode loop) as `run.py evaluate` runs it: the
    model with LoRA folded in, replicated on every chip, the rows split over all chips."""
    quantization = Quantization.of(experiment.train.base_quantization, experiment.train.quantization_block_size)
    merged = dataclasses.replace(experiment, model=planned_model(experiment.model).replace(lora=None))
    model, config, _ = model_for(merged, target_, quantization)
    mesh = make_mesh(MeshConfig(data=-1), target_.devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(model)
    rows = batch_per_chip * len(target_.devices)
    size = config.vision.image_size
    split = lambda *shape: NamedSharding(mesh, PartitionSpec("data", *[None] * (len(shape) - 1)))  # noqa: E731
    inputs = (jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=split(rows, prompt)),
              jax.ShapeDtypeStruct((rows, size, size, 3), jnp.float32, sharding=split(rows, size, size, 3)),
              jax.ShapeDtypeStruct((rows, prompt), jnp.int32, sharding=split(rows, prompt)),
              None if config.prior_position == "off" else
              jax.ShapeDtypeStruct((rows, config.prior_dim), jnp.float32, sharding=split(rows, config.prior_dim)),
              jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    generation = GenerationConfig(max_new_tokens=max_new_tokens)

    def step(state, ids, pixels, mask, landmarks, key):
        return generate_step(nnx.merge(graphdef, state), ids, pixels, mask, landmarks,
                             jax.random.wrap_key_data(key), generation)

    compiled, refusal = _compile(step, (_abstract(state, jax.tree.map(lambda _: replicated, state)), *inputs), mesh)
    weights = (placed_bytes(state, compiled.input_formats[0][0]) if compiled is not None
               else bytes_per_chip(state, jax.tree.map(lambda _: replicated, state)))
    cost = step_cost(config, batch_per_chip, prompt, remat=None, new_tokens=max_new_tokens,
                     weight_bytes=bytes_per_chip(state, jax.tree.map(lambda _: replicated, state)))
    return _plan(compiled, refusal, batch_per_chip, weights, 0, cost)


def largest_batch(fits: Callable[[int], bool], limit: int) -> int:
    """The largest per-chip batch up to `limit` that `fits` (0: not even one row), by doubling then
    bisection: about 2 log2(batch) compiles."""
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def decoder_matmul_params(config: EmolaConfig) -> int:
    """Weights one token multiplies through in the decoder's projections, LoRA factors included."""
    text = config.text
    h, f, hd = text.hidden_size, text.intermediate_size, text.resolved_head_dim
    shapes = {"q_proj": (h, text.num_attention_heads * hd), "k_proj": (h, text.num_key_value_heads * hd),
              "v_proj": (h, text.num_key_value_heads * hd), "o_proj": (text.num_attention_heads * hd, h),
              "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    lora = config.lora
    per_layer = sum(fan_in * fan_out + (lora.rank * (fan_in + fan_out) if lora and name in lora.targets else 0)
                    for name, (fan_in, fan_out) in shapes.items())
    return per_layer * text.num_hidden_layers


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB // 10 else f"{value / 2**20:.1f} MiB"


def describe(plan: Plan, target_: Target, *, what: str, device_gib: float | None = None, tokens: int = 0) -> list[str]:
    """The plan as lines for a person: memory per chip against the chip's HBM, FLOPs, roofline."""
    chip = target_.chip
    capacity = capacity_gib(chip, device_gib)
    verdict = "fits" if plan.fits(chip, device_gib) else "does NOT fit"
    lines = [f"{what}, {plan.batch} row(s) per chip:"]
    if plan.refused:
        lines.append(f"  refused by the compiler: {plan.refused[:400]}")
        if plan.temporaries:
            lines.append(f"  needs at least {_gib(plan.total)} per chip: weights {_gib(plan.weights)}, optimiser "
                         f"state {_gib(plan.optimizer)} and the compiler's temporaries {_gib(plan.temporaries)}")
        return lines
    of = f" of {capacity:g} GiB" + (" usable" if device_gib is None else "") if capacity else ""
    lines += [f"  weights          {_gib(plan.weights):>12}   (frozen base + trainable master copies)",
              f"  optimiser state  {_gib(plan.optimizer):>12}",
              f"  temporaries      {_gib(plan.temporaries):>12}",
              f"  total            {_gib(plan.total):>12}{of}: {verdict}",
              *([f"  host memory      {_gib(plan.host):>12}   (pinned, beside the chip: offloaded layer inputs)"]
                if plan.host else []),
              f"  FLOPs per step   {plan.flops:12.3e}   (from the shapes; {plan.model_flops:.3e} without remat)"]
    if chip is not None:
        seconds, bound, mfu = plan.roofline(chip)
        milliseconds = f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.3f}"
        lines.append(f"  roofline         {milliseconds:>9} ms   ({bound}-bound at {chip.peak_flops / 1e12:g} "
                     f"TFLOP/s and {chip.hbm_bandwidth / 1e9:g} GB/s per chip)")
        if tokens:
            lines.append(f"  at the roofline  {tokens / seconds:12,.0f}   tokens/s per chip, MFU {mfu:.0%}")
    return lines


def run(experiment: Experiment, topology: str, *, num_slices: int = 1, batch: int = 4, seq: int = 2048,
        search: bool = True, max_batch: int = 64, evaluate: bool = False, prompt_length: int = 640,
        max_new_tokens: int = 128, device_gib: float | None = None, log: Callable[[str], None] = print) -> Plan:
    """`run.py plan`: compiles the train step (or with `evaluate`, the generate step) for
    `topology`, logs the plan per chip, and with `search` the largest per-chip batch that fits.
    Returns the plan at `batch`."""
    target_ = target(topology, num_slices)
    cfg = experiment.train
    config = planned_model(experiment.model)
    chips = len(target_.devices)
    if target_.chip:
        log(f"{target_.name}: {chips} x {target_.chip.name} ({target_.chip.hbm_gib:g} GiB HBM, "
            f"{target_.chip.usable_gib:g} usable, "
            f"{target_.chip.peak_flops / 1e12:g} TFLOP/s bf16, {target_.chip.hbm_bandwidth / 1e9:g} GB/s per chip; "
            f"figures from {target_.chip.source})")
    else:
        log(f"cpu: {chips} device(s) of this machine (XLA:CPU's plan: an upper bound for an accelerator)")
    base = cfg.base_quantization if cfg.base_quantization != "none" else config.dtype
    if evaluate:
        what = (f"generate step (prefill {prompt_length} + {max_new_tokens} new tokens), weights replicated, "
                f"base {base}")
        plan_at = functools.partial(plan_generate, experiment, target_, prompt=prompt_length,
                                    max_new_tokens=max_new_tokens)
    else:
        mesh = make_mesh(cfg.mesh, target_.devices)
        shape = ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
        lora = f"LoRA r{config.lora.rank}" if config.lora else "no LoRA"
        what = f"train step, mesh {shape}, sequence {seq}, remat {cfg.remat}, {lora}, base {base}"
        plan_at = functools.partial(plan_train, experiment, target_, seq=seq)
    log(f"compiling the {what.split(',')[0]} for {target_.name} (minutes at 7B on a small CPU)...")
    plan = plan_at(batch)
    tokens = batch * (max_new_tokens if evaluate else seq)  # new tokens when generating
    for line in describe(plan, target_, what=what, device_gib=device_gib, tokens=tokens):
        log(line)
    if search:
        log(f"searching the largest batch per chip (up to {max_batch})...")
        cache = {batch: plan}

        def fits(rows: int) -> bool:
            if rows not in cache:
                cache[rows] = plan_at(rows)
                log(f"  {rows} row(s): {_gib(cache[rows].total)}, "
                    f"{'fits' if cache[rows].fits(target_.chip, device_gib) else 'does not fit'}")
            return cache[rows].fits(target_.chip, device_gib)

        best = largest_batch(fits, max_batch)
        unit = f" x {seq} tokens" if not evaluate else ""
        log(f"largest batch that fits: {best} row(s){unit} per chip" if best else "not even one row fits")
    log("This is the TPU compiler's plan for the step, not a timing: nothing ran." if target_.chip else
        "This is XLA:CPU's plan for the step, not a timing: nothing ran.")
    return plan
