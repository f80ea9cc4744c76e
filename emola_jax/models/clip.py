"""CLIP vision transformer, names mirroring transformers' `CLIPVisionTransformer`.

The frozen tower is small beside the decoder and replicated on every device: each of its weights
declares all its axes `None`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.config import VisionConfig
from emola_jax.models.layers import Linear, scan_layers, stack_layers
from emola_jax.sharding import axes_metadata

REPLICATED = (None, None)  # a kernel's (in, out)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        self.patch_embedding = nnx.Param(init(rngs.params(), (p, p, c, d), dtype), **axes_metadata((None,) * 4))  # HWIO
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), dtype), **axes_metadata((None,)))
        self.position_embedding = nnx.Embed(config.num_patches + 1, d, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                            embedding_metadata=axes_metadata(REPLICATED))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values `[batch, height, width, channels]` -> `[batch, 1 + patches, embed]`."""
        batch, height, width, channels = pixel_values.shape
        p = self.config.patch_size
        if height != self.config.image_size or width != self.config.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width}, the vision tower expects "
                f"{self.config.image_size}x{self.config.image_size}"
            )
        # A stride-p convolution with a p x p kernel is a matmul over non-overlapping patches.
        patches = pixel_values.reshape(batch, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, p * p * channels)
        kernel = self.patch_embedding[...].reshape(p * p * channels, -1)
        tokens = patches.astype(kernel.dtype) @ kernel  # [batch, patches, embed]
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1) + self.position_embedding.embedding[...]


class CLIPAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.head_dim = config.head_dim
        self.q_proj = Linear(d, d, axes=REPLICATED, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, axes=REPLICATED, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, axes=REPLICATED, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, axes=REPLICATED, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, _ = x.shape
        q, k, v = (p(x).reshape(batch, seq, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(jax.nn.dot_product_attention(q, k, v).reshape(batch, seq, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        if config.hidden_act != "quick_gelu":
            raise ValueError(f"vision activation {config.hidden_act!r} is not supported (quick_gelu only)")
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, axes=REPLICATED, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, axes=REPLICATED, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


def _layer_norm(config: VisionConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    replicated = axes_metadata((None,))
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs,
                         scale_metadata=replicated, bias_metadata=replicated)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(config, dtype, rngs)
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, dtype, rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        make = lambda r: CLIPEncoderLayer(config, dtype=dtype, rngs=r)  # noqa: E731
        self.layers = stack_layers(make, config.num_hidden_layers, rngs)


class CLIPVisionModel(nnx.Module):
    """Pre-layernorm ViT. `post_layernorm` is kept for faithful round trips; LLaVA does not use it."""

    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config, dtype, rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.post_layernorm = _layer_norm(config, dtype, rngs)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None, *, remat: bool = False) -> jax.Array:
        """Hidden state after `num_layers` encoder layers (all by default): HF's `hidden_states[num_layers]`."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        return scan_layers(self.encoder.layers, hidden, num_layers=num_layers, remat=remat)
