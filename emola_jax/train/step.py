"""The training step as a pure function over two trees: the trainable weights and the frozen base.

Gradients and optimiser state exist only for the trainable tree (LoRA factors, the prior
projector, optionally the multi-modal projector), which is float32; the base keeps its storage
dtype and is never donated. What moves from step to step is a `TrainState`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from emola_jax.data.conversation import IGNORE_INDEX
from emola_jax.data.pipeline import Batch
from emola_jax.train.config import TrainConfig
from emola_jax.weights import path_name

LOSS_CHUNK_BYTES = 512 << 20  # float32 logits that may exist at once in the loss
LOSS_CHUNK_POSITIONS = 256  # the granularity at which unscored positions are skipped


@struct.dataclass
class TrainState:
    """Everything a step updates, and all a training checkpoint holds (the frozen base is apart).

        step       int32 []    updates made, skipped ones included
        params     the trainable weights, a float32 pure dict: the master copy the optimiser updates
        opt_state  optax state over `params` (Adam's moments shaped like them)
        rng        uint32 [2]  key data; each step folds its number in
        skipped    int32 []    updates dropped for a non-finite loss or gradient
    """

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    skipped: jax.Array


def learning_rate_for(path: str, trainable: tuple[tuple[str, float | None], ...]) -> float | None:
    """The learning rate of the first pattern that matches `path` in full; None: frozen."""
    for pattern, rate in trainable:
        if re.fullmatch(pattern, path):
            return rate
    return None


def split_trainable(model: nnx.Module, config: TrainConfig) -> tuple[nnx.GraphDef, nnx.State, dict, nnx.State]:
    """`(graphdef, template, params, frozen)` by the config's path patterns.

    `params` are the trainable weights as a float32 pure dict (the master copy the optimiser
    updates); `template` records their storage dtypes, to which the forward pass casts them.
    """
    is_trainable = lambda path, _: learning_rate_for(path_name(path), config.trainable) is not None  # noqa: E731
    graphdef, trainable, frozen = nnx.split(model, is_trainable, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"no weight matches the trainable patterns {[p for p, _ in config.trainable]}")
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    params = jax.tree.map(_float32, nnx.to_pure_dict(trainable))
    return graphdef, template, params, frozen


def _float32(x):
    """Cast an array, or describe the cast of an abstract one (memory plans run on shapes alone)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return x.astype(jnp.float32)


def warmup_steps(config: TrainConfig) -> int:
    """Linear-warmup length: `ceil(steps * warmup_ratio)`, as transformers' trainer counts it
    (`TrainingArguments.get_warmup_steps`), so a 10-step run with ratio 0.03 warms up for 1 step."""
    return math.ceil(config.steps * config.warmup_ratio)


def _schedule(config: TrainConfig, peak: float) -> optax.Schedule:
    warmup = warmup_steps(config)
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup]
        ) if warmup else optax.constant_schedule(peak)
    # linear warmup from 0, then cosine down to 0 at the last step (as transformers' cosine schedule)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.steps, warmup + 1), end_value=0.0)


def learning_rate_groups(config: TrainConfig, params: dict) -> tuple[dict, dict[str, float]]:
    """`(labels, peaks)`: each trainable leaf's group name (`lr=<rate>`) and each group's peak rate;
    one AdamW per distinct rate."""
    rates = jax.tree_util.tree_map_with_path(lambda path, _: learning_rate_for(path_name(path), config.trainable),
                                             params)
    labels = jax.tree.map(lambda rate: f"lr={rate}", rates)
    return labels, {f"lr={rate}": rate for rate in jax.tree.leaves(rates)}


def make_optimizer(config: TrainConfig, params: dict) -> tuple[optax.GradientTransformation, dict]:
    """AdamW per learning-rate group after global-norm clipping; also the schedules, for logging."""
    labels, peaks = learning_rate_groups(config, params)
    schedules = {name: _schedule(config, peak) for name, peak in sorted(peaks.items(), key=lambda kv: kv[1])}
    adamw = functools.partial(
        optax.adamw, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    transforms = {name: adamw(schedule) for name, schedule in schedules.items()}
    chain = [optax.multi_transform(transforms, labels)]
    if config.max_grad_norm is not None:
        chain.insert(0, optax.clip_by_global_norm(config.max_grad_norm))
    return optax.chain(*chain), schedules


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_loss(logits_fn: Callable, hidden: jax.Array, targets: jax.Array, consts: list) -> jax.Array:
    """Summed cross-entropy of one chunk; `logits_fn(hidden, *consts)` is closure-converted."""
    return _chunk_loss_and_grads(logits_fn, hidden, targets, consts, with_consts=False)[0]


def _chunk_loss_and_grads(logits_fn, hidden, targets, consts, *, with_consts: bool):
    logits, vjp = jax.vjp(lambda h, c: logits_fn(h, *c).astype(jnp.float32), hidden, consts)  # [batch, chunk, vocab]
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    loss = jnp.sum(jnp.where(valid, log_z - picked, 0.0))
    # d loss / d logits = softmax - one_hot, on scored positions only
    d_logits = jnp.exp(logits - log_z[..., None]) - jax.nn.one_hot(safe, logits.shape[-1], dtype=logits.dtype)
    d_hidden, d_consts = vjp(jnp.where(valid[..., None], d_logits, 0.0))
    return loss, d_hidden, (d_consts if with_consts else None)


def _chunk_loss_fwd(logits_fn, hidden, targets, consts):
    """The gradient is made in the forward pass: the residual is `[batch, chunk, embed]`, never
    the `[batch, chunk, vocab]` logits, and nothing is recomputed in the backward pass."""
    perturbed = any(c.perturbed for c in jax.tree.leaves(consts, is_leaf=lambda x: hasattr(x, "perturbed")))
    value = lambda x: jax.tree.map(lambda p: p.value, x, is_leaf=lambda p: hasattr(p, "perturbed"))  # noqa: E731
    loss, d_hidden, d_consts = _chunk_loss_and_grads(
        logits_fn, hidden.value, targets.value, value(consts), with_consts=perturbed
    )
    return loss, (d_hidden, d_consts)


def _chunk_loss_bwd(logits_fn, residuals, g):
    d_hidden, d_consts = residuals
    scaled = lambda x: (g * x).astype(x.dtype)  # noqa: E731
    return scaled(d_hidden), None, None if d_consts is None else jax.tree.map(scaled, d_consts)


_chunk_loss.defvjp(_chunk_loss_fwd, _chunk_loss_bwd, symbolic_zeros=True)


def token_cross_entropy(
    logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of scored tokens.

    hidden `[batch, seq, embed]`, labels `[batch, seq]` aligned with the inputs (position t is
    scored on predicting labels[t+1]). Logits are made only where they are scored: each row's
    scored positions are moved to its front, and chunks of positions (at most `LOSS_CHUNK_BYTES`
    of logits, at most `LOSS_CHUNK_POSITIONS` positions) in which no row scores anything are
    skipped. Instruction data scores only the answers (a fifth of a FABA row, after 577 image
    tokens), so most of the vocabulary projection is never computed. Each chunk's gradient is
    made with its loss, so a 7B batch's float32 logits never exist beyond one chunk.
    """
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    scored_first = jnp.argsort(targets == IGNORE_INDEX, axis=1, stable=True)  # [batch, seq]
    targets = jnp.take_along_axis(targets, scored_first, axis=1)
    hidden = jnp.take_along_axis(hidden, scored_first[..., None], axis=1)  # rows stay on their shard
    batch, seq, _ = hidden.shape
    vocab = jax.eval_shape(logits_fn, hidden[:1, :1]).shape[-1]
    by_bytes = 1 << int(LOSS_CHUNK_BYTES // (4 * batch * vocab)).bit_length() - 1
    chunk = min(seq, LOSS_CHUNK_POSITIONS, max(16, by_bytes))
    pad = -seq % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hidden = hidden.reshape(batch, -1, chunk, hidden.shape[-1]).swapaxes(0, 1)  # [chunks, batch, chunk, embed]
    targets = targets.reshape(batch, -1, chunk).swapaxes(0, 1)  # [chunks, batch, chunk]
    # the weights logits_fn closes over become explicit, so the loss can carry its own gradient rule
    converted, consts = jax.closure_convert(logits_fn, hidden[0])

    def body(total, xs):
        h, t = xs
        scored = t[:, 0] != IGNORE_INDEX  # scored positions come first in every row
        loss = jax.lax.cond(
            jnp.any(scored), lambda *a: _chunk_loss(converted, *a), lambda *_: jnp.float32(0), h, t, consts
        )
        return total + loss, None

    loss, _ = jax.lax.scan(body, jnp.float32(0), (hidden, targets))
    return loss, jnp.sum(targets != IGNORE_INDEX)


def as_model_state(template: nnx.State, params: dict) -> nnx.State:
    """The float32 master weights cast to their storage dtypes, as an `nnx.State` to merge."""
    state = jax.tree.map(lambda x: x, template)
    dtypes = nnx.to_pure_dict(template)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda p, t: p.astype(t.dtype), params, dtypes))
    return state


def make_loss_fn(graphdef: nnx.GraphDef, template: nnx.State, config: TrainConfig) -> Callable:
    """`loss_fn(params, frozen, batch, dropout_key) -> (summed loss, scored tokens)` for one micro-batch
    of right-padded rows; `dropout_key=None` turns LoRA dropout off. The attention kernel is the
    one the model held when split (`LlamaModel.set_attention`)."""

    def loss_fn(params, frozen, batch: Batch, dropout_key):
        model = nnx.merge(graphdef, as_model_state(template, params), frozen)
        hidden = model.hidden_states(
            batch.input_ids, batch.pixel_values, batch.attention_mask, batch.landmarks,
            right_padded=True, remat=config.remat, dropout_key=dropout_key,
        )
        return token_cross_entropy(model.logits, hidden, batch.labels)

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    trainable_template: nnx.State,
    optimizer: optax.GradientTransformation,
    config: TrainConfig,
) -> Callable[[TrainState, nnx.State, Batch], tuple[TrainState, dict]]:
    """`step(state, frozen, batch) -> (state, metrics)`, to be jitted by the caller.

    `batch` holds `[accum, rows, ...]` arrays (its `ids` None: they stay on the host); the gradient
    is that of the mean loss over every scored token of all micro-batches, exactly as if they were
    one batch.
    """

    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, trainable_template, config), has_aux=True)

    def step(state: TrainState, frozen: nnx.State, batch: Batch) -> tuple[TrainState, dict]:
        params = state.params
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        accum = batch.input_ids.shape[0]

        def micro_step(carry, xs):
            grads, loss, count = carry
            micro, index = xs
            (micro_loss, micro_count), micro_grads = grad_fn(params, frozen, micro, jax.random.fold_in(key, index))
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, loss + micro_loss, count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, count), _ = jax.lax.scan(
            micro_step, (zeros, jnp.float32(0), jnp.int32(0)), (batch, jnp.arange(accum))
        )
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        loss = loss / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite,
                   "input_tokens": jnp.sum(batch.attention_mask), "skipped": new_state.skipped}
        return new_state, metrics

    return step


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.int32(0),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.int32(0),
    )
