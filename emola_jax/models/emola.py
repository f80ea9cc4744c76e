"""EmoLA: LLaVA-1.5 with facial prior tokens (one per configured prior) spliced in beside the visual tokens."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

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
    prior tokens, in the order `config.prior_position` says. `landmarks` is `[batch, prior_dim]`:
    the features of `config.priors` concatenated in order, each projected by its own MLP
    (`PriorToken.projector_name`: `prior_projector` for 2d106det, `prior_projector_<name>` else).
    With `config.visual_tokens` off the image side is the prior tokens alone (no CLIP call).
    """

    def __init__(self, config: EmolaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        text, vision = config.text, config.vision
        self.vision_tower = CLIPVisionModel(vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MlpProjector(
            vision.hidden_size, text.hidden_size, use_bias=config.projector_bias, dtype=dtype, rngs=rngs
        )
        if config.prior_position != "off":
            for prior in config.priors:
                setattr(self, prior.projector_name,
                        MlpProjector(prior.dim, text.hidden_size, use_bias=True, dtype=dtype, rngs=rngs))
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

    def prior_tokens(self, landmarks: jax.Array, dtype) -> jax.Array:
        """`landmarks [batch, prior_dim]` split by the priors' dims, each projected by its own MLP:
        `[batch, num_prior_tokens, embed]` in config order."""
        tokens, start = [], 0
        for prior in self.config.priors:
            feature = landmarks[:, start:start + prior.dim].astype(dtype)
            tokens.append(getattr(self, prior.projector_name)(feature))
            start += prior.dim
        return jnp.stack(tokens, axis=1)

    def image_side_embeddings(self, pixel_values: jax.Array, landmarks: jax.Array | None):
        """Visual tokens and the prior tokens: `[batch, image_seq_length, embed]`."""
        config = self.config
        visual = self.image_features(pixel_values) if config.visual_tokens else None
        if config.prior_position == "off":
            return visual
        if landmarks is None:
            raise ValueError(f"this model places {config.num_prior_tokens} facial prior token(s) "
                             f"{config.prior_position} the visual tokens: pass landmarks [batch, {config.prior_dim}]")
        dtype = jnp.dtype(config.dtype) if visual is None else visual.dtype
        prior = self.prior_tokens(landmarks, dtype)
        if visual is None:
            return prior
        parts = (visual, prior) if config.prior_position == "after" else (prior, visual)
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
        if not isinstance(input_ids, jax.core.Tracer):  # eager calls; jitted entry points ran `check_inputs`
            _check_image_tokens(np.asarray(input_ids), self.config, pixel_values is not None)
        if pixel_values is None:
            return embeds
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
        right_padded: bool = False,
        remat: bool | str = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids `[batch, seq]`, pixel_values `[batch, height, width, 3]`, landmarks `[batch, prior_dim]`.

        Training passes `right_padded=True` (causal-only attention, see `LlamaModel`) and
        `dropout_key` (LoRA dropout); the frozen vision tower is never rematerialised.
        """
        return self.logits(self.hidden_states(input_ids, pixel_values, attention_mask, landmarks, position_ids,
                                              right_padded=right_padded, remat=remat, dropout_key=dropout_key))

    def hidden_states(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        landmarks: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        right_padded: bool = False,
        remat: bool | str = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The decoder's normed output `[batch, seq, embed]`, before the vocabulary projection."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        embeds = self.embed(input_ids, pixel_values, landmarks)
        return self.language_model(embeds, attention_mask, position_ids, right_padded=right_padded, remat=remat,
                                   dropout_key=dropout_key)


def check_inputs(
    config: EmolaConfig,
    input_ids,
    pixel_values=None,
    attention_mask=None,
    landmarks=None,
    *,
    padding: Literal["left", "right"] | None = None,
    max_new_tokens: int = 0,
) -> None:
    """Raises a one-sentence ValueError where the inputs do not fit `config`; with
    `max_new_tokens`, also where the longest prompt and that many new tokens pass the context.

    It reads values (placeholder counts per row, 0/1 masks, where the padding lies, finite
    landmarks), so it runs on concrete arrays before jit: under a trace those values are unknown,
    and a wrong placeholder count would shift every image embedding without a word. Rows without
    a real token (batch fillers) need no placeholders. Arrays spread over processes are gathered
    (every process runs the same check on the same global batch).
    """
    ids = _host(input_ids, "input_ids")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer ids [batch, seq], not {ids.dtype} of shape {ids.shape}")
    batch = ids.shape[0]
    real = None
    if attention_mask is not None:
        mask = _host(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; input_ids have {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask holds values other than 0 and 1")
        if padding is not None:
            check_padding(mask, padding)
        real = mask.any(axis=-1)
        longest, context = int(mask.sum(axis=-1).max(initial=0)), config.text.max_position_embeddings
        if longest + max_new_tokens > context:
            raise ValueError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens exceed the model's context "
                             f"of {context} positions")
    if pixel_values is not None:
        size = config.vision.image_size
        if tuple(pixel_values.shape) != (batch, size, size, 3):
            raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; this model takes "
                             f"[batch, {size}, {size}, 3] with batch {batch}, as input_ids")
        if config.prior_position != "off":
            _check_landmarks(config, landmarks, batch)
    _check_image_tokens(ids, config, pixel_values is not None, real)


def _host(x, name: str) -> np.ndarray:
    """`x` as a numpy array: gathered when spread over processes; refused under a trace."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"check_inputs reads the values of {name}: call it on concrete arrays, before jit")
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def check_padding(mask: np.ndarray, side: str, name: str = "attention_mask") -> None:
    """Left: each row of `mask` `[rows, seq]` is `0 .. 0 1 .. 1` and ends in a real token; right:
    `1 .. 1 0 .. 0`. ValueError names the first row that is not (`name`: the mask's name)."""
    steps = np.diff(mask.astype(np.int8), axis=-1)
    if side == "left":
        bad, what = (steps < 0).any(axis=-1) | (mask[:, -1] == 0), "left-padded with its last token real"
    elif side == "right":
        bad, what = (steps > 0).any(axis=-1), "right-padded"
    else:
        raise ValueError(f"padding {side!r} is unknown; choose left or right")
    rows = np.flatnonzero(bad)
    if rows.size:
        raise ValueError(f"row {int(rows[0])} of {name} is not {what}")


def _check_landmarks(config: EmolaConfig, landmarks, batch: int) -> None:
    if landmarks is None:
        raise ValueError(f"this model places {config.num_prior_tokens} facial prior token(s) {config.prior_position} "
                         f"the visual tokens: pass landmarks [batch, {config.prior_dim}]")
    values = _host(landmarks, "landmarks")
    if values.shape != (batch, config.prior_dim):
        raise ValueError(f"landmarks have shape {values.shape}; this model takes [{batch}, {config.prior_dim}]")
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise ValueError(f"landmarks hold {bad} values that are NaN or infinite; a landmark feature is finite")


def _check_image_tokens(ids: np.ndarray, config: EmolaConfig, with_images: bool, real: np.ndarray | None = None):
    """Every row with a real token holds exactly `image_seq_length` placeholders (none without
    images): a wrong count is an error, not a silent shift of the image embeddings."""
    counts = (ids == config.image_token_id).sum(axis=-1)
    expected = config.image_seq_length if with_images else 0
    wrong = counts != expected
    rows = np.flatnonzero(wrong if real is None else wrong & real)
    if not rows.size:
        return
    row, count = int(rows[0]), int(counts[rows[0]])
    if not with_images:
        raise ValueError(f"row {row} of input_ids holds {count} image tokens but no pixel_values were given")
    n = config.num_prior_tokens
    parts = (["visual tokens"] if config.visual_tokens else []) + (
        ["the prior token"] if n == 1 else [f"the {n} prior tokens"] if n else [])
    raise ValueError(f"row {row} of input_ids holds {count} image tokens; this model expects exactly {expected} "
                     f"per row ({' plus '.join(parts)})")
