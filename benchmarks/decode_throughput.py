"""Batched greedy decoding: this project's KV-cache `generate` beside transformers' `generate`.

Same mid-size LLaVA-shaped model on both sides (decoder 8 x 1024, FFN 2816, vocab 32000, GQA-free;
a 4-layer CLIP at 224 px, so 256 image tokens), float32, batch 8, a 512-token prompt (256 image +
256 text), exactly 128 new tokens (no EOS), this machine's CPU, one run. The last line is
`decode_speedup_vs_torch: <jax/torch>`.

    python benchmarks/decode_throughput.py [--batch 8] [--new 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
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

    start = time.perf_counter()
    run_jax()
    compile_seconds = time.perf_counter() - start
    results = {}
    for name, fn in (("emola-jax generate", run_jax), ("transformers generate", run_torch)):
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - start)
        results[name] = (args.batch * args.new / best, best, tokens)
    jax_tps, torch_tps = results["emola-jax generate"][0], results["transformers generate"][0]
    agree = (results["emola-jax generate"][2] == results["transformers generate"][2]).mean()
    print(f"batch {args.batch}, prompt 512, {args.new} new tokens, float32, torch threads {torch.get_num_threads()}")
    print(f"emola-jax first call (compile + run): {compile_seconds:.1f} s")
    for name, (tps, seconds, _) in results.items():
        print(f"{name:24} {tps:8.1f} new tokens/s  ({seconds:.2f} s, best of {args.repeats})")
    print(f"greedy tokens identical: {100 * agree:.1f}%")
    print(f"decode_speedup_vs_torch: {jax_tps / torch_tps:.2f}")


if __name__ == "__main__":
    main()
