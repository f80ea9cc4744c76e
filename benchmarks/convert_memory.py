"""Peak memory and time of `run.py convert` on a checkpoint with the exact shapes of LLaVA-1.5-7B.

Writes random float16 tensors named and sharded like llava-hf/llava-1.5-7b-hf (about 14 GB) into
a temporary folder, then measures, each in a fresh process:
  1. reading every file once (the floor for any converter),
  2. this project's converter (to bfloat16, the dtype a 7B run uses),
  3. the naive route: transformers `from_pretrained` + `state_dict()` to numpy.
Prints a table and, last, `convert_peak_rss_gb: <value>`.

    python benchmarks/convert_memory.py [--dir /path/with/40GB/free] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768, model_type="clip_vision_model")
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
            model_type="llama")
CONFIG = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"], image_token_index=32000,
              vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
              vision_config=VISION, text_config=TEXT, torch_dtype="float16")


def llava_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape, in the llava-hf (language_model.model.*, vision_tower.vision_model.*) layout."""
    v, t = VISION, TEXT
    d, f, vd, vf = t["hidden_size"], t["intermediate_size"], v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    shapes = {
        "vision_tower.vision_model.embeddings.class_embedding": (vd,),
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (vd, 3, 14, 14),
        "vision_tower.vision_model.embeddings.position_embedding.weight": (patches + 1, vd),
        "vision_tower.vision_model.pre_layrnorm.weight": (vd,), "vision_tower.vision_model.pre_layrnorm.bias": (vd,),
        "vision_tower.vision_model.post_layernorm.weight": (vd,),
        "vision_tower.vision_model.post_layernorm.bias": (vd,),
        "multi_modal_projector.linear_1.weight": (d, vd), "multi_modal_projector.linear_1.bias": (d,),
        "multi_modal_projector.linear_2.weight": (d, d), "multi_modal_projector.linear_2.bias": (d,),
        "language_model.model.embed_tokens.weight": (t["vocab_size"], d),
        "language_model.model.norm.weight": (d,),
        "language_model.lm_head.weight": (t["vocab_size"], d),
    }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{name}.weight"], shapes[p + f"self_attn.{name}.bias"] = (vd, vd), (vd,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (vf, vd), (vf,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (vd, vf), (vd,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"], shapes[p + f"{norm}.bias"] = (vd,), (vd,)
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """Streams random float16 tensors into one safetensors file (header first, then data)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            f.write((0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16).tobytes())


def write_checkpoint(directory: Path, shards: int = 3) -> int:
    shapes = llava_7b_shapes()
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    rng = np.random.default_rng(0)
    weight_map, current, budget = {}, [], total / shards
    groups, size = [], 0
    for key, shape in shapes.items():
        current.append(key)
        size += int(np.prod(shape)) * 2
        if size >= budget and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / name, {k: shapes[k] for k in group}, rng)
        weight_map.update(dict.fromkeys(group, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return total


CHILD = {
    "read_once": """
import sys, time, pathlib
start = time.perf_counter()
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
    with open(f, "rb", buffering=0) as fh:
        while fh.read(64 << 20):
            pass
""",
    "emola_jax_convert": """
import sys, time
sys.path.insert(0, sys.argv[3])
start = time.perf_counter()
from converters import convert
convert(sys.argv[1], sys.argv[2], dtype="bfloat16", overwrite=True, progress=False)
""",
    "from_pretrained_state_dict": """
import sys, time
start = time.perf_counter()
import torch
from transformers import LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float16)
arrays = {k: v.float().to(torch.bfloat16).view(torch.int16).numpy() for k, v in model.state_dict().items()}
""",
}
# VmHWM is the peak RSS of this process image alone (ru_maxrss would include the parent's at fork).
REPORT = """
import json, re
seconds = time.perf_counter() - start
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": seconds, "peak_rss_gb": peak_kb / 2**20}))
"""


def measure(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD[name] + REPORT, *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (needs about 30 GB free)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    parser.add_argument("--src", type=Path, default=None, help="reuse a synthetic checkpoint kept by --keep")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="emola-convert-bench-", dir=args.dir))
    try:
        src, out = args.src or scratch / "llava-1.5-7b-hf", scratch / "converted"
        if args.src is None:
            src.mkdir()
            start = time.perf_counter()
            total = write_checkpoint(src)
            seconds = time.perf_counter() - start
            print(f"wrote synthetic LLaVA-1.5-7B checkpoint: {total / 1e9:.2f} GB in {seconds:.0f} s")
        rows = {
            "read files once": measure("read_once", str(src)),
            "emola-jax convert (bf16)": measure("emola_jax_convert", str(src), str(out), str(ROOT)),
            "from_pretrained + state_dict": measure("from_pretrained_state_dict", str(src)),
        }
        print(f"{'':32}{'seconds':>10}{'peak RSS GB':>14}")
        for name, row in rows.items():
            print(f"{name:32}{row['seconds']:>10.1f}{row['peak_rss_gb']:>14.2f}")
        ours, floor = rows["emola-jax convert (bf16)"], rows["read files once"]
        baseline = rows["from_pretrained + state_dict"]
        print(f"convert_time_vs_read_once: {ours['seconds'] / floor['seconds']:.2f}")
        print(f"convert_rss_vs_from_pretrained: {ours['peak_rss_gb'] / baseline['peak_rss_gb']:.3f}")
        print(f"convert_peak_rss_gb: {ours['peak_rss_gb']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
