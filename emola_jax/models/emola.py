"""EmoLA: LLaVA-1.5 with one facial prior token spliced in beside the visual tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.config import EmolaConfig
from emola_jax.models.clip import CLIPVisionModel
from emola_jax.models.layers import Linear, MlpProjector
from emola_jax.models.llama import LlamaModel


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip padding (left or right), so a padded row sees the same RoPE angles."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def scatter_image_embeddings(
    text_embeds: jax.Array, image_embeds: jax.Array, is_image: jax.Array
) -> jax.Array:
    """Puts the k-th image-side embedding of each row at that row's k-th image-token position.

    text_embeds `[batch, seq, embed]`, image_embeds `[batch, image_tokens, embed]`, is_image
    `[batch, seq]`. A gather with static shapes: no dynamic masked_scatter, one compile per bucket.
    """
    index = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, index[..., None], axis=1)  # [batch, seq, embed]
    return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class EmolaForConditionalGeneration(nnx.Module):
    """`model(input_ids, pixel_values, attention_mask, landmarks) -> logits [batch, seq, vocab]`.

    `input_ids` already holds `config.image_seq_length` image-token ids per image (576 visual + 1
    prior at 336 px); the model fills those positions with the projected CLIP features and the
    prior token, in the order `config.prior_position` says.
    """

    def __init__(self, config: EmolaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        text, vision = config.text, config.vision
        self.vision_tower = CLIPVisionModel(vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MlpProjector(
            vision.hidden_size, text.hidden_size, use_bias=config.projector_bias, dtype=dtype, rngs=rngs
        )
        self.prior_projector = (
            None
            if config.prior_position == "off"
            else MlpProjector(config.prior_dim, text.hidden_size, use_bias=True, dtype=dtype, rngs=rngs)
        )
        self.language_model = LlamaModel(text, config.lora, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if text.tie_word_embeddings
            else Linear(text.hidden_size, text.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=dtype,
                        rngs=rngs)
        )

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """CLIP features of the configured layer, projected: `[batch, visual_tokens, embed]`."""
        hidden = self.vision_tower(pixel_values, self.config.vision_layers_used)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return self.multi_modal_projector(hidden)

    def image_side_embeddings(self, pixel_values: jax.Array, landmarks: jax.Array | None):
        """Visual tokens plus the prior token: `[batch, image_seq_length, embed]`."""
        visual = self.image_features(pixel_values)
        if self.prior_projector is None:
            return visual
        if landmarks is None:
            raise ValueError(
                f"this model places a facial prior token {self.config.prior_position} the visual tokens: "
                "pass landmarks [batch, 212]"
            )
        prior = self.prior_projector(landmarks.astype(visual.dtype))[:, None, :]  # [batch, 1, embed]
        parts = (visual, prior) if self.config.prior_position == "after" else (prior, visual)
        return jnp.concatenate(parts, axis=1)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        landmarks: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the image-side embeddings scattered in: `[batch, seq, embed]`."""
        is_image = input_ids == self.config.image_token_id
        # The placeholder id may lie outside the vocabulary (original LLaVA uses -200): embed 0 there.
        embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))
        if pixel_values is None:
            _check_no_image_tokens(is_image)
            return embeds
        _check_image_token_counts(is_image, self.config.image_seq_length)
        image_embeds = self.image_side_embeddings(pixel_values, landmarks)
        return scatter_image_embeddings(embeds, image_embeds, is_image)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        landmarks: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        remat: bool | str = False,
        attention: str | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids `[batch, seq]`, pixel_values `[batch, height, width, 3]`, landmarks `[batch, 212]`.

        Training passes `attention` (causal-only kernels for right-padded rows, see `LlamaModel`)
        and `dropout_key` (LoRA dropout); the frozen vision tower is never rematerialised.
        """
        return self.logits(self.hidden_states(input_ids, pixel_values, attention_mask, landmarks, position_ids,
                                              remat=remat, attention=attention, dropout_key=dropout_key))

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        landmarks: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        remat: bool | str = False,
        attention: str | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The decoder's normed output `[batch, seq, embed]`, before the vocabulary projection."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        embeds = self.embed(input_ids, pixel_values, landmarks)
        return self.language_model(embeds, attention_mask, position_ids, remat=remat, attention=attention,
                                   dropout_key=dropout_key)


def _concrete(x: jax.Array) -> np.ndarray | None:
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_image_token_counts(is_image: jax.Array, expected: int) -> None:
    """Outside jit, a row with the wrong number of placeholders is an error, not a silent shift."""
    counts = _concrete(is_image)
    if counts is None:
        return
    counts = counts.sum(axis=-1)
    bad = np.flatnonzero(counts != expected)
    if bad.size:
        raise ValueError(
            f"row {int(bad[0])} of input_ids holds {int(counts[bad[0]])} image tokens; this model "
            f"expects exactly {expected} per row (visual tokens plus the prior token)"
        )


def _check_no_image_tokens(is_image: jax.Array) -> None:
    counts = _concrete(is_image)
    if counts is not None and counts.any():
        raise ValueError("input_ids hold image tokens but no pixel_values were given")
