"""`check_inputs`: the value checks that entry points run on concrete arrays before jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emola_jax.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.models.emola import check_inputs

CONFIG = EmolaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=28),
    text=TextConfig(vocab_size=50, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2),
    image_token_id=49, prior_position="after",
)
IMAGE = CONFIG.image_seq_length  # 4 visual tokens at 28 px / 14, plus the prior


def _batch(lengths, seq=12, side="right"):
    ids = np.zeros((len(lengths), seq), np.int32)
    mask = np.zeros((len(lengths), seq), np.int32)
    for row, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(seq - n, seq)
        mask[row, span] = 1
        ids[row, span] = [1] + [CONFIG.image_token_id] * IMAGE + [7] * (n - 1 - IMAGE)
    pixels = np.zeros((len(lengths), 28, 28, 3), np.float32)
    landmarks = np.zeros((len(lengths), CONFIG.prior_dim), np.float32)
    return ids, pixels, mask, landmarks


def test_a_good_batch_passes_and_filler_rows_need_no_placeholders():
    ids, pixels, mask, landmarks = _batch([10, 8])
    ids[1], mask[1] = 0, 0  # an all-padding row stands in for a bad record
    check_inputs(CONFIG, ids, pixels, mask, landmarks, padding="right")
    check_inputs(CONFIG, *_batch([10, 8], side="left"), padding="left")


@pytest.mark.parametrize("change, message", [
    (lambda b: b[0].__setitem__((1, 2), 7), r"^row 1 of input_ids holds 4 image tokens; this model expects exactly "
                                            r"5 per row \(visual tokens plus the prior token\)$"),
    (lambda b: b[2].__setitem__((0, 0), 0), r"^row 0 of attention_mask is not right-padded$"),
    (lambda b: b[2].__setitem__((1, 0), 2), r"^attention_mask holds values other than 0 and 1$"),
    (lambda b: b[3].__setitem__((1, 5), np.nan), r"^landmarks hold 1 values that are NaN or infinite; "),
])
def test_the_first_bad_value_is_named(change, message):
    batch = list(_batch([10, 8]))
    change(batch)
    with pytest.raises(ValueError, match=message):
        check_inputs(CONFIG, *batch, padding="right")


def test_shapes_and_missing_inputs_are_named():
    ids, pixels, mask, landmarks = _batch([10, 8])
    with pytest.raises(ValueError, match=r"^pixel_values have shape \(2, 14, 14, 3\); this model takes"):
        check_inputs(CONFIG, ids, pixels[:, :14, :14], mask, landmarks)
    with pytest.raises(ValueError, match="pass landmarks"):
        check_inputs(CONFIG, ids, pixels, mask, None)
    with pytest.raises(ValueError, match=r"^landmarks have shape \(2, 3\)"):
        check_inputs(CONFIG, ids, pixels, mask, landmarks[:, :3])
    with pytest.raises(ValueError, match=r"^row 0 of input_ids holds 5 image tokens but no pixel_values were given$"):
        check_inputs(CONFIG, ids, None, mask)


def test_traced_values_are_refused_not_skipped():
    ids, pixels, mask, landmarks = _batch([10, 8])
    with pytest.raises(TypeError, match="before jit"):
        jax.jit(lambda i: check_inputs(CONFIG, i, pixels, mask, landmarks))(jnp.asarray(ids))
