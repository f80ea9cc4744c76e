"""Training input pipeline throughput at the 7B settings, on this machine.

EmoLA-7B's data settings: 336 px CLIP preprocessing with padding to square, 577 image tokens
(576 visual + 1 prior), max length 2048 with the default length buckets, a LLaMA tokenizer of
32,000 pieces (BPE with byte fallback trained here on generated text, built as transformers'
`LlamaTokenizer`), FABA-like records (JPEG faces of 300-700 px, one question, a 60-130 word
answer), landmarks from an ArrayRecord file, grain worker processes. Worker start-up and the
first batch are not timed. The last line is `pipeline_samples_per_s: <value>`.

    python benchmarks/pipeline_throughput.py [--records 400] [--batch-size 16] [--workers 2] [--batches 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "we", "xi", "yu", "za", "bre", "cla", "dro", "fle",
             "gri", "pla", "sto", "tru", "an", "el", "is", "om", "ur", "ing", "ed", "ly", "er", "ous"]
FACE_WORDS = ["brow", "brows", "eyes", "mouth", "lips", "cheek", "raised", "lowered", "smile", "frown", "tension",
              "happiness", "sadness", "surprise", "anger", "fear", "disgust", "neutral", "AU1", "AU2", "AU4",
              "AU6", "AU12", "AU25", "the", "a", "with", "and", "of", "face", "person", "slightly", "corners"]


def make_tokenizer(rng: np.random.Generator):
    """A 32,000-piece LLaMA tokenizer (BPE with byte fallback, `▁` word marks) trained here on made-up
    words plus the template and face vocabulary, built as transformers' `LlamaTokenizer`."""
    import json as json_lib

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from emola_jax.data.conversation import SYSTEM

    syllables = np.array(SYLLABLES)
    parts = syllables[rng.integers(0, len(syllables), (200000, 5))].tolist()
    words = list(dict.fromkeys("".join(p[:n]) for p, n in zip(parts, rng.integers(1, 6, 200000).tolist(),
                                                                    strict=True)))
    english = [SYSTEM, "USER: ASSISTANT:", "What emotions are conveyed by this face?",
               "What AUs are conveyed by this face?", " ".join(FACE_WORDS)]
    picks = rng.integers(0, len(words), (40000, 20)).tolist()
    corpus = [" ".join(words[i] for i in row) for row in picks] + english * 2000
    model = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=32000, special_tokens=special,
                                                          show_progress=False))
    state = json_lib.loads(model.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return LlamaTokenizer(vocab=state["vocab"], merges=merges, legacy=False, add_bos_token=True,
                          add_eos_token=False)


def make_records(root: Path, count: int, rng: np.random.Generator) -> Path:
    import cv2

    from emola_jax.data import landmark_store

    (root / "images").mkdir(parents=True)
    records, features = [], {}
    for i in range(count):
        h, w = (int(v) for v in rng.integers(300, 700, 2))
        pixels = cv2.resize(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8), (w, h),
                            interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "images" / f"{i:05d}.jpg"), pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])
        answer = " ".join(rng.choice(FACE_WORDS, rng.integers(60, 130))) + "."
        question = "What emotions are conveyed by this face?" if i % 2 else "What AUs are conveyed by this face?"
        records.append({"id": f"r{i:05d}", "image": f"images/{i:05d}.jpg",
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": answer}]})
        features[f"r{i:05d}"] = rng.standard_normal(212).astype(np.float32)
    (root / "train.json").write_text(json.dumps(records))
    landmark_store.write_file(root / "landmarks.array_record", features.items())
    return root / "train.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=25)
    args = parser.parse_args()

    from emola_jax.config import EmolaConfig
    from emola_jax.data.pipeline import PipelineConfig, make_train_loader

    model = EmolaConfig()  # ViT-L/14 at 336 px, 576 visual tokens + the prior token
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        tokenizer = make_tokenizer(rng)
        annotations = make_records(root, args.records, rng)
        setup_s = time.perf_counter() - start
        config = PipelineConfig(annotations=str(annotations), landmarks=str(root / "landmarks.array_record"),
                                batch_size=args.batch_size, max_length=2048, worker_count=args.workers, seed=0)
        start = time.perf_counter()
        loader = make_train_loader(config, tokenizer, model)
        source_s = time.perf_counter() - start
        iterator = iter(loader)
        start = time.perf_counter()
        first = next(iterator)
        first_s = time.perf_counter() - start
        lengths = [first.input_ids.shape[1]]
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(iterator)
            lengths.append(batch.input_ids.shape[1])
        elapsed = time.perf_counter() - start

    samples = args.batches * args.batch_size
    print(f"tokenizer vocab {len(tokenizer)}; {args.records} records; setup {setup_s:.1f} s")
    print(f"source (tokenise + check every record) {source_s:.2f} s; worker start + first batch {first_s:.1f} s")
    print(f"batch {args.batch_size} x length {sorted(set(lengths))}, pixel_values {first.pixel_values.shape}, "
          f"{args.workers} workers")
    print(f"{samples} samples in {elapsed:.2f} s")
    print(f"pipeline_samples_per_s: {samples / elapsed:.1f}")


if __name__ == "__main__":
    main()
