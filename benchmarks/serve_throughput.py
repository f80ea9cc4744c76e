"""`run.py serve` under load, beside transformers' `generate` serving the same model one request at a time.

For each model, `run.py serve` is started (16 rows, 512 cache slots per row) and N clients (1, 4, 8,
16) each send requests one after another through the official `openai` client, streaming: throughput
is every answer's
tokens (the server's `usage`) over the wall time of the level; time to first token is from sending
to the first content chunk. The baseline answers the same requests in this process, one at a time,
with transformers' `generate` (greedy, the same answer lengths) on the model's transformers form:
its throughput does not grow with clients, and its time to first token is its queue.

Models: the demo's (`--demo DIR`, what `run.py demo` wrote: its trained model, landmark graph and
transformers export with the prior projector) and the mid-size LLaVA-shaped one of the other
benchmarks (random, no prior token, the demo's tokenizer with a word for every id of its 32,000;
its answers run to `--max-tokens`).

    python benchmarks/serve_throughput.py --demo demo_out [--clients 1,4,8,16] [--requests 3]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is installed with the dev extra; no TPU here
QUESTION = "What emotions are conveyed by this face?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("demo_out"))
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--models", default="demo,midsize")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    records = json.loads((args.demo / "faces" / "eval_emotion_anno.json").read_text())
    images = [args.demo / "faces" / r["image"] for r in records[:16]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, onnx, baseline = (_demo(args.demo) if name == "demo" else _midsize(args.demo, Path(tmp)))
            print(f"\n== {name} model ({model})")
            served = _serve_levels(model, onnx, images, levels, args.requests, args.max_tokens)
            base = baseline(images[: args.requests * 2], args.max_tokens)
            one = served[levels[0]]
            print(f"{'clients':>8} {'tokens/s':>9} {'x 1 client':>10} {'x baseline':>10} {'TTFT p50 s':>11} "
                  f"{'x 1 client':>10}")
            for level in levels:
                tps, ttft = served[level]
                print(f"{level:8d} {tps:9.1f} {tps / one[0]:10.2f} {tps / base[0]:10.2f} {ttft:11.3f} "
                      f"{ttft / one[1]:10.2f}")
            print(f"{'baseline':>8} {base[0]:9.1f} {'':>10} {'1.00':>10} {base[1]:11.3f}   (transformers generate, "
                  "one request at a time, in process; its column is seconds per whole answer)")


def _serve_levels(model: Path, onnx: Path | None, images: list[Path], levels: list[int], requests: int,
                  max_tokens: int) -> dict[int, tuple[float, float]]:
    """(tokens/s, p50 time to first token) per client count, through `run.py serve`; prints where
    the mean time to first token goes (the engine's queue and prefill, from `/health`'s totals)."""
    import httpx
    import openai

    from tests.processes import free_port

    port = free_port()
    command = [sys.executable, str(ROOT / "run.py"), "serve", "--ckpt", str(model), "--port", str(port),
               "--rows", "16", "--queue", "64", "--name", "m", "--cache-length", "512"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = subprocess.Popen(command + (["--onnx", str(onnx)] if onnx else []), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start: {log.read()[-3000:]}") from None
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]

        def ask(i: int) -> tuple[int, float]:
            sent = time.perf_counter()
            first, tokens = None, 0
            messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                     {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}}]}]
            for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                        stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - sent
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return tokens, first if first is not None else time.perf_counter() - sent

        ask(0)  # the first call of each prompt bucket compiles
        results = {}
        health = lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()  # noqa: E731
        for level in levels:
            before = health()
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(level) as pool:
                done = list(pool.map(lambda c: [ask(c * requests + r) for r in range(requests)], range(level)))
            wall = time.perf_counter() - start
            flat = [x for client_runs in done for x in client_runs]
            results[level] = (sum(t for t, _ in flat) / wall, statistics.median(f for _, f in flat))
            after = health()
            admitted = after["admitted"] - before["admitted"]
            queued = (after["queue_seconds"] - before["queue_seconds"]) / admitted
            prefill = (after["prefill_seconds"] - before["prefill_seconds"]) / admitted
            mean = statistics.mean(f for _, f in flat)
            print(f"  {level} clients: time to first token, mean {mean:.3f} s = engine queue {queued:.3f} s + prefill "
                  f"and first token {prefill:.3f} s + the rest (HTTP, image decoding, prior, delivery) "
                  f"{mean - queued - prefill:.3f} s", flush=True)
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)


def _demo(demo: Path):
    """The demo's model, its landmark graph, and transformers' generate on its export (prior spliced in)."""

    def baseline(images: list[Path], max_tokens: int) -> tuple[float, float]:
        import torch
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from emola_jax.apps.demo_models import embeds_with_prior
        from emola_jax.checkpoint import load_config
        from emola_jax.data import conversation
        from emola_jax.data.priors import image_feature
        from emola_jax.predictor import ImageInputs

        model_dir = demo / "run" / "model"
        config = load_config(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
        hf = LlavaForConditionalGeneration.from_pretrained(demo / "export" / "hf").eval()
        ids = conversation.tokenize_with_image(tokenizer, conversation.generation_prompt(QUESTION),
                                               config.image_token_id, config.image_seq_length)[None].astype(np.int64)
        inputs = ImageInputs(config, demo / "landmark_model.onnx")

        def one(image: Path) -> int:
            from emola_jax.data.image import decode_rgb

            feature = image_feature(image, onnx=demo / "landmark_model.onnx", priors=config.priors)
            pixels = inputs.pixels([decode_rgb(image)])
            embeds = embeds_with_prior(hf, demo / "export" / "hf" / "prior_projector.safetensors", ids, pixels,
                                       feature[None])
            with torch.no_grad():
                out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  do_sample=False, max_new_tokens=max_tokens, pad_token_id=0,
                                  eos_token_id=tokenizer.eos_token_id)
            return int(out.shape[1])

        return _one_at_a_time(one, images)

    return demo / "run" / "model", demo / "landmark_model.onnx", baseline


def _midsize(demo: Path, tmp: Path):
    """The mid-size random LLaVA (no prior token) converted, with the demo's tokenizer; its baseline."""
    import midsize
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from converters import convert

    torch.manual_seed(0)
    config = midsize.llava_config()
    reference = LlavaForConditionalGeneration(config).eval()
    reference.save_pretrained(tmp / "hf")
    tokenizer = AutoTokenizer.from_pretrained(demo / "run" / "model" / "tokenizer")
    # every id of the random model's vocabulary a word, so that each new token is text the client sees
    tokenizer.add_tokens([f" w{i}" for i in range(config.text_config.vocab_size - len(tokenizer))])
    tokenizer.save_pretrained(tmp / "hf")
    model = convert(tmp / "hf", tmp / "jax", progress=False)

    def baseline(images: list[Path], max_tokens: int) -> tuple[float, float]:
        from transformers import AutoTokenizer

        from emola_jax.data import conversation
        from emola_jax.data.image import decode_rgb
        from emola_jax.predictor import ImageInputs

        tokenizer = AutoTokenizer.from_pretrained(tmp / "hf")
        ids = conversation.tokenize_with_image(tokenizer, conversation.generation_prompt(QUESTION), midsize.IMAGE_TOKEN,
                                               256)[None].astype(np.int64)
        from emola_jax.checkpoint import load_config

        inputs = ImageInputs(load_config(model))

        def one(image: Path) -> int:
            pixels = torch.tensor(inputs.pixels([decode_rgb(image)])).permute(0, 3, 1, 2)
            with torch.no_grad():
                out = reference.generate(input_ids=torch.tensor(ids), pixel_values=pixels, do_sample=False,
                                         max_new_tokens=max_tokens, pad_token_id=0,
                                         eos_token_id=tokenizer.eos_token_id)
            return int(out.shape[1] - ids.shape[1])

        return _one_at_a_time(one, images)

    return model, None, baseline


def _one_at_a_time(one, images: list[Path]) -> tuple[float, float]:
    """(tokens/s, mean seconds per request) of `one(image) -> new tokens`, one request after another."""
    one(images[0])  # warm
    start, tokens = time.perf_counter(), 0
    for image in images:
        tokens += one(image)
    wall = time.perf_counter() - start
    return tokens / wall, wall / len(images)


if __name__ == "__main__":
    main()
