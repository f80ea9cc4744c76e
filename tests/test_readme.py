"""The README's Python, run as written on the demo's trained model."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_block(after: str) -> str:
    """The first ```python block of README.md that follows the line starting with `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_prior_token_snippet_gives_the_models_logits(demo_run, tmp_path, dtype):
    import torch
    from transformers import LlavaForConditionalGeneration

    from emola_jax.demo import held_out_inputs
    from emola_jax.demo_models import logits_with_prior

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    model_dir, faces = workdir / "run" / "model", workdir / "faces"
    export = tmp_path / "hf"
    done = subprocess.run([sys.executable, "run.py", "export", str(model_dir), str(export), "--format", "hf",
                           "--dtype", dtype], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ids, pixels, landmarks, mask = held_out_inputs(model_dir, faces / "eval_emotion_anno.json",
                                                   faces / "landmarks.array_record")
    code = readme_block("The prior token in PyTorch").replace("exported/emola-7b-hf", str(export))
    scope = {"input_ids": torch.tensor(ids), "pixel_values": torch.tensor(pixels).permute(0, 3, 1, 2),
             "landmarks": torch.tensor(landmarks), "mask": torch.tensor(mask)}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's code, as a reader runs it
    theirs = scope["logits"].float().numpy()

    reference = LlavaForConditionalGeneration.from_pretrained(workdir / "export" / "hf").eval()  # the demo's float32
    expected = logits_with_prior(reference, workdir / "export" / "hf" / "prior_projector.safetensors", ids, pixels,
                                 landmarks, mask)
    if dtype == "float32":
        np.testing.assert_allclose(theirs, expected, atol=1e-5, rtol=0)
    else:  # bfloat16 weights and activations: within its rounding, the same top token nearly everywhere
        scale = np.abs(expected).max()
        assert np.abs(theirs - expected).max() < 0.05 * scale
        assert (theirs.argmax(-1) == expected.argmax(-1)).mean() > 0.9
