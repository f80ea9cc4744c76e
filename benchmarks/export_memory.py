"""Peak memory and time of `run.py export --format hf` on a checkpoint with the exact shapes of LLaVA-1.5-7B.

Writes the synthetic llava-hf checkpoint of `convert_memory.py` (random float16, about 14 GB),
converts it to bfloat16 (not measured), then measures, each in a fresh process:
  1. reading every file of the emola-jax checkpoint once (the floor for any exporter),
  2. this project's exporter to a transformers directory (bfloat16, 5 GB shards).
Prints a table and, last, `export_peak_rss_gb: <value>`.

    python benchmarks/export_memory.py [--dir /path/with/45GB/free] [--keep] [--ckpt converted/]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_memory import REPORT, ROOT, write_checkpoint  # noqa: E402

CHILD = {
    "read_once": """
import sys, time, pathlib
start = time.perf_counter()
for f in sorted(p for p in pathlib.Path(sys.argv[1]).rglob("*") if p.is_file()):
    with open(f, "rb", buffering=0) as fh:
        while fh.read(64 << 20):
            pass
""",
    "emola_jax_export": """
import sys, time
sys.path.insert(0, sys.argv[3])
start = time.perf_counter()
from converters import export
export(sys.argv[1], sys.argv[2], fmt="hf", overwrite=True, progress=False)
""",
}


def measure(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD[name] + REPORT, *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (needs about 45 GB free)")
    parser.add_argument("--keep", action="store_true", help="keep the converted checkpoint and the export")
    parser.add_argument("--ckpt", type=Path, default=None, help="reuse a converted checkpoint kept by --keep")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="emola-export-bench-", dir=args.dir))
    try:
        ckpt, out = args.ckpt or scratch / "converted", scratch / "exported-hf"
        if args.ckpt is None:
            src = scratch / "llava-1.5-7b-hf"
            src.mkdir()
            start = time.perf_counter()
            total = write_checkpoint(src)
            seconds = time.perf_counter() - start
            print(f"wrote synthetic LLaVA-1.5-7B checkpoint: {total / 1e9:.2f} GB in {seconds:.0f} s")
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "run.py"), "convert", str(src), str(ckpt),
                            "--dtype", "bfloat16"], check=True, capture_output=True)
            print(f"converted to bfloat16 in {time.perf_counter() - start:.0f} s")
            shutil.rmtree(src)  # only the converted checkpoint is needed from here on
        rows = {
            "read checkpoint once": measure("read_once", str(ckpt)),
            "emola-jax export hf (bf16)": measure("emola_jax_export", str(ckpt), str(out), str(ROOT)),
        }
        print(f"checkpoint {folder_bytes(ckpt) / 1e9:.2f} GB, export {folder_bytes(out) / 1e9:.2f} GB")
        print(f"{'':32}{'seconds':>10}{'peak RSS GB':>14}")
        for name, row in rows.items():
            print(f"{name:32}{row['seconds']:>10.1f}{row['peak_rss_gb']:>14.2f}")
        ours, floor = rows["emola-jax export hf (bf16)"], rows["read checkpoint once"]
        print(f"export_time_vs_read_once: {ours['seconds'] / floor['seconds']:.2f}")
        print(f"export_peak_rss_gb: {ours['peak_rss_gb']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}")


if __name__ == "__main__":
    main()
