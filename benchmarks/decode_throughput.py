"""Batched greedy decoding: this project's KV-cache `generate` beside transformers' `generate`.

Same mid-size LLaVA-shaped model on both sides (decoder 8 x 1024, FFN 2816, vocab 32000, GQA-free;
a 4-layer CLIP at 224 px, so 256 image tokens), float32, batch 8, a 512-token prompt (256 image +
256 text), exactly 128 new tokens (no EOS), this machine's CPU, one run. The last line is
`decode_speedup_vs_torch: <jax/torch>`.

Before it, the split that bounds the ratio: prefill (a run with one new token) and seconds per decode
step on each side, and the floor of a decode step on this machine: the time to read once, in a
jitted reduction, the bytes every step must read (decoder and lm_head weights, the whole static KV
cache). A step cannot beat that floor and the prefill is matmul-bound on both sides, so the best
end-to-end ratio here is the torch time over (the faster prefill + the new tokens at the floor).

    python benchmarks/decode_throughput.py [--batch 8] [--new 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import midsize
    import torch
    from transformers import LlavaForConditionalGeneration

    import emola_jax
    from converters import convert
    from emola_jax.generate import GenerationConfig, generate

    torch.manual_seed(0)
    config = midsize.llava_config()
    reference = LlavaForConditionalGeneration(config).eval()
    image_tokens = 256
    rng = np.random.default_rng(0)
    text = rng.integers(3, 31000, (args.batch, 512 - image_tokens))
    ids = np.concatenate([text[:, :8], np.full((args.batch, image_tokens), midsize.IMAGE_TOKEN), text[:, 8:]], axis=1)
    mask = np.ones_like(ids)
    pixels = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "hf")
        model, _ = emola_jax.load_pretrained(convert(Path(tmp) / "hf", Path(tmp) / "jax", progress=False))

    gen = GenerationConfig(max_new_tokens=args.new, eos_token_id=-1, pad_token_id=0)

    def run_jax():
        return np.asarray(generate(model, ids.astype(np.int32), pixels, mask.astype(np.int32), None,
                                   jax.random.key(0), gen))

    def run_torch():
        with torch.no_grad():
            out = reference.generate(
                input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=args.new,
                min_new_tokens=args.new, pad_token_id=0,
            )
        return out[:, ids.shape[1]:].numpy()

    def run_jax_prefill():
        return np.asarray(generate(model, ids.astype(np.int32), pixels, mask.astype(np.int32), None,
                                   jax.random.key(0), dataclasses.replace(gen, max_new_tokens=1)))

    def run_torch_prefill():
        with torch.no_grad():
            return reference.generate(
                input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=1, pad_token_id=0,
            )

    run_jax_prefill()
    start = time.perf_counter()
    run_jax()
    compile_seconds = time.perf_counter() - start
    results = {}
    for name, fn in (("emola-jax generate", run_jax), ("transformers generate", run_torch),
                     ("emola-jax prefill", run_jax_prefill), ("transformers prefill", run_torch_prefill)):
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - start)
        results[name] = (args.batch * args.new / best, best, tokens)
    floor = _step_floor(model, args.batch, ids.shape[1] + args.new)
    jax_tps, torch_tps = results["emola-jax generate"][0], results["transformers generate"][0]
    agree = (results["emola-jax generate"][2] == results["transformers generate"][2]).mean()
    print(f"batch {args.batch}, prompt 512, {args.new} new tokens, float32, torch threads {torch.get_num_threads()}")
    print(f"emola-jax first call (compile + run): {compile_seconds:.1f} s")
    for side in ("emola-jax", "transformers"):
        total, prefill = results[f"{side} generate"][1], results[f"{side} prefill"][1]
        print(f"{side + ' generate':24} {results[side + ' generate'][0]:8.1f} new tokens/s  ({total:.2f} s, best of "
              f"{args.repeats}): prefill {prefill:.2f} s, {(total - prefill) / (args.new - 1):.3f} s per decode step")
    best_prefill = min(results["emola-jax prefill"][1], results["transformers prefill"][1])
    ceiling = results["transformers generate"][1] / (best_prefill + (args.new - 1) * floor)
    print(f"decode step floor (weights + KV cache read once): {floor:.3f} s; ratio ceiling here: {ceiling:.2f}")
    print(f"greedy tokens identical: {100 * agree:.1f}%")
    print(f"decode_speedup_vs_torch: {jax_tps / torch_tps:.2f}")


def _step_floor(model, batch: int, cache_length: int) -> float:
    """Seconds to read the decoder and lm_head weights and a full KV cache once (best of 5)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    text = model.config.text
    head = model.lm_head if model.lm_head is not None else model.language_model.embed_tokens
    weights = jax.tree.leaves(nnx.state(model.language_model.layers)) + jax.tree.leaves(nnx.state(head))
    cache = [jnp.ones((batch, text.num_key_value_heads, cache_length, text.resolved_head_dim), jnp.float32)
             for _ in range(2 * text.num_hidden_layers)]
    read_all = jax.jit(lambda arrays: sum(jnp.sum(a) for a in arrays))
    arrays = weights + cache
    read_all(arrays).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        read_all(arrays).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
