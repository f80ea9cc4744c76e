"""Causal attention on TPUs: the Pallas splash-attention kernel, under `shard_map` over the mesh.

XLA's attention on a TPU materialises every `[seq, seq]` score matrix of a layer (at EmoLA-7B's
4 x 2048 per chip, 2 GiB of float32 scores per layer, kept for the backward pass). The splash
kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, MaxText's default on TPU) computes
attention block by block with an online softmax, skips the blocks the causal mask hides, and
keeps only the output and the log-sum-exp per query.

A Pallas call cannot be split by XLA's partitioner, so it runs inside `shard_map`: rows over the
batch axes and heads over `tensor` of the mesh set with `jax.set_mesh`, which every caller that
places arrays on a mesh sets (without a mesh the kernel sees the whole batch). On a platform other
than TPU the kernel runs in Pallas's interpret mode, which is how the tests check its numbers on
a CPU against `xla` attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from emola_jax.sharding import BATCH_AXES

LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # the largest that divides the (padded) sequence is used


def target_platform() -> str:
    """The platform the code being traced will run on: the mesh's (`jax.set_mesh`, also a TPU
    topology compiled from a CPU), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None = None) -> jax.Array:
    """Causal attention by the splash kernel; grouped-query heads handled by the kernel.

    q `[batch, seq, heads, head_dim]`; k, v heads-first `[batch, kv_heads, seq, head_dim]` (the
    KV cache's layout); `key_valid [batch, seq]` (bool) marks real tokens of left- or right-padded
    rows: a real query then sees real keys only (segment ids 1 against 0), exact for every real
    token. Returns `[batch, seq, heads, head_dim]` in q's dtype. The sequence is padded to a
    multiple of 128 at its end, which no real query sees under the causal mask.
    """
    batch, seq, heads, head_dim = q.shape
    pad = -seq % LANES
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # [batch, heads, seq, hd]
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    segments = None if key_valid is None else key_valid.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        segments = None if segments is None else jnp.pad(segments, ((0, 0), (0, pad)))
    mesh = jax.sharding.get_abstract_mesh()
    rows = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
    if rows and batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()  # fewer rows than the batch axes split (one prompt on a pod): each device takes them all
    tensor = 1 if mesh.empty or "tensor" not in mesh.axis_names else mesh.shape["tensor"]
    head_axis = "tensor" if tensor > 1 and heads % tensor == 0 and k.shape[1] % tensor == 0 else None
    local_heads = heads // (tensor if head_axis else 1)
    attend = functools.partial(_attend, heads=local_heads, seq=seq + pad, interpret=target_platform() != "tpu")
    if rows or head_axis:
        spec = PartitionSpec(rows or None, head_axis, None, None)
        segment_spec = PartitionSpec(rows or None, None)
        attend = jax.shard_map(attend, in_specs=(spec, spec, spec, segment_spec if segments is not None else None),
                               out_specs=spec, check_vma=False)
    out = attend(q, k, v, segments)
    return out[:, :, :seq].transpose(0, 2, 1, 3)


def _attend(q, k, v, segments, *, heads: int, seq: int, interpret: bool):
    """One shard: q `[rows, heads, seq, hd]`, k and v `[rows, kv_heads, seq, hd]`, segments `[rows, seq]`."""
    block = next(b for b in BLOCKS if seq % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    if segments is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segments)
