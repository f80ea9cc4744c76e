"""Memory plan of the real EmoLA-7B train step on a mesh of 8 devices, from shapes alone.

The step is lowered and compiled for abstract inputs (nothing is allocated or run; 8 virtual CPU
devices stand in for the accelerators) and XLA's own accounting is printed per device: weights and
optimiser state (arguments), what the step writes (outputs, aliased to the donated state) and
its temporaries, for sequence 2048 and per-device batch 1, 4, 16.

    python benchmarks/memory_plan.py [--mesh data=8] [--batches 1,4,16] [--remat full] [--attention blockwise]
    python benchmarks/memory_plan.py --mesh data=1 --batches 1,4,8 --quantization none,int8,nf4 --device-gib 24

CPU compilation stands in for the GPU's: the attention's temporaries follow the implementation
compiled here (`blockwise` keeps one block of scores per query block, close to what a flash kernel
keeps; XLA's `xla` materialises the full [seq, seq] scores). Allow a few gigabytes beyond the plan
for the runtime and fragmentation.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


def plan(config_name: str, mesh_text: str, batch_per_device: int, seq: int, remat: str, attention: str,
         quantization: str = "none", block_size: int = 64) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import configs
    from emola_jax.checkpoint import abstract_model
    from emola_jax.quantization import Quantization, quantize_model
    from emola_jax.sharding import MeshConfig, batch_sharding, logical_axes_table, make_mesh, state_shardings
    from emola_jax.train import step as train_step
    from emola_jax.train.config import planned_model

    experiment = configs.load(config_name)
    cfg = dataclasses.replace(experiment.train, remat=remat, attention=attention, mesh=MeshConfig.parse(mesh_text))
    mesh = make_mesh(cfg.mesh)
    model_config = planned_model(experiment.model)
    model = abstract_model(model_config)
    model.language_model.set_attention(attention)
    axes = logical_axes_table(model)
    if quantization != "none":  # QLoRA: the frozen decoder kernels as codes + scales
        quantize_model(model, Quantization(quantization, block_size))
    graphdef, template, params, frozen = train_step.split_trainable(model, cfg)
    optimizer, _ = train_step.make_optimizer(cfg, params)
    init = functools.partial(train_step.init_state, optimizer=optimizer, seed=0)
    state = jax.eval_shape(init, params)
    with_sharding = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, state_shardings(tree, mesh, axes))
    state, frozen = with_sharding(state), with_sharding(frozen)

    rows = batch_per_device * mesh.shape["data"] * mesh.shape["fsdp"]
    size = model_config.vision.image_size
    shapes = {"input_ids": ((1, rows, seq), jnp.int32), "labels": ((1, rows, seq), jnp.int32),
              "attention_mask": ((1, rows, seq), jnp.int32), "pixel_values": ((1, rows, size, size, 3), jnp.float32),
              "landmarks": ((1, rows, model_config.prior_dim), jnp.float32)}
    batch = {}
    for name, (shape, dtype) in shapes.items():
        rows_spec = batch_sharding(mesh, len(shape) - 1).spec  # [accum, rows, ...]: rows split
        batch[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(None, *rows_spec)))
    step = train_step.make_train_step(graphdef, template, optimizer, cfg)
    state_out = jax.tree.map(lambda x: x.sharding, state)
    compiled = jax.jit(step, donate_argnums=(0,), out_shardings=(state_out, NamedSharding(mesh, PartitionSpec()))) \
        .lower(state, frozen, batch).compile()
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="emola_7b")
    parser.add_argument("--mesh", default="data=8")
    parser.add_argument("--batches", default="1,4,16", help="per-device batch sizes")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--attention", default="blockwise", choices=["blockwise", "xla"])
    parser.add_argument("--device-gib", type=float, default=80.0, help="accelerator memory to compare with")
    parser.add_argument("--quantization", default="none",
                        help="frozen-base storage to plan, comma-separated: none, int8, nf4 (QLoRA)")
    parser.add_argument("--block-size", type=int, default=64, help="inputs per quantisation scale")
    args = parser.parse_args()
    print(f"{args.config}, mesh {args.mesh}, sequence {args.seq}, remat {args.remat}, attention {args.attention}; "
          "GiB per device:")
    print(f"{'base':>5} {'batch/device':>12} {'arguments':>10} {'outputs':>8} {'aliased':>8} {'temporaries':>12} "
          f"{'total':>8}  fits {args.device_gib:.0f} GiB")
    for quantization in args.quantization.split(","):
        for batch in map(int, args.batches.split(",")):
            m = plan(args.config, args.mesh, batch, args.seq, args.remat, args.attention, quantization,
                     args.block_size)
            fits = "yes" if m["total"] / GIB < args.device_gib * 0.9 else "no"
            print(f"{quantization:>5} {batch:>12} {m['arguments'] / GIB:>10.2f} {m['outputs'] / GIB:>8.2f} "
                  f"{m['aliased'] / GIB:>8.2f} {m['temporaries'] / GIB:>12.2f} {m['total'] / GIB:>8.2f}  {fits}",
                  flush=True)


if __name__ == "__main__":
    main()
