"""The demo's tiny EmoLA trained on its drawn faces from its converted base (after `run.py demo`).

Also the layout of the folder `python run.py demo` writes (`DemoInputs`), which the demo fills
and this config reads.

Run `python run.py demo` first (it writes `demo_out/`), then, e.g. on two processes of one machine:

    python run.py train --config demo_faces --workdir runs/faces \
        --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0   # and --process-id 1
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from configs.tiny import get_config as tiny
from emola_jax.config import PriorToken
from emola_jax.data.drawn_faces import annotation_files
from emola_jax.data.pipeline import PipelineConfig
from emola_jax.train.config import FromBase

DEMO_DIR = "demo_out"  # relative to the working directory


@dataclasses.dataclass(frozen=True)
class DemoInputs:
    """What the demo trains from, all on disk: a converted base (with its tokenizer), drawn faces
    with their annotation files, and their precomputed prior features: one file, or one per prior
    of the model in its order."""

    base: Path
    faces: Path
    annotations: dict[str, Path]  # train_emotion, train_au, eval_emotion, eval_au
    landmarks: Path | tuple[Path, ...]
    import_logit_diff: float | None = None  # the converted base against transformers

    @classmethod
    def in_folder(cls, workdir: str | Path, priors: tuple[PriorToken, ...] = (PriorToken(),)) -> DemoInputs:
        """The inputs a finished demo of a model with `priors` left in `workdir` (e.g. `demo_out`)."""
        workdir = Path(workdir)
        return cls(base=workdir / "base", faces=workdir / "faces", annotations=annotation_files(workdir / "faces"),
                   landmarks=feature_files(workdir / "faces", priors))

    def training_data(self, seed: int = 0, **changes):
        """The grain pipeline over the training faces, as the demo trains."""
        settings = dict(annotations=(str(self.annotations["train_emotion"]), str(self.annotations["train_au"])),
                        images_root=str(self.faces), max_length=256,
                        landmarks=self.landmarks,
                        length_buckets=(128, 192, 256), batch_size=16, seed=seed, worker_count=0)
        return PipelineConfig(**{**settings, **changes})


def feature_files(faces: Path, priors: tuple[PriorToken, ...]) -> Path | tuple[Path, ...]:
    """One file per prior, named after it (2d106det's: landmarks.array_record); a lone file as a Path."""
    files = tuple(faces / f"{'landmarks' if p.official else p.name}.array_record" for p in priors)
    return files[0] if len(files) == 1 else files


def from_base(experiment, inputs: DemoInputs, seed: int = 0):
    """`experiment` (a whole tiny model) trained from the demo's base on its faces: the model
    section keeps only what training adds, the rest is the base's."""
    return dataclasses.replace(experiment, model=FromBase.of(experiment.model), data=inputs.training_data(seed),
                               train=dataclasses.replace(experiment.train, base=str(inputs.base)))


def get_config():
    return from_base(tiny(), DemoInputs.in_folder(DEMO_DIR))
