"""tensorflow-datasets builders for FABA-Instruct and the traditional datasets, writing ArrayRecord.

These run without TensorFlow: `GeneratorBasedBuilder` with `file_format="array_record"` encodes
examples with TFDS's own protobuf code as long as no feature needs TF to encode (tfds's `Image`
feature does, so images are stored as their original encoded bytes, decoded by the pipeline).

Every builder writes the same features:

    id, source, subject, label, reference   text
    image                                   bytes: the image file as it is on disk
    conversations                           sequence of {from, value}
    landmarks                               float32[212], and has_landmarks (bool)

Splits: FABA-Instruct `train` and `test` (configs `emotion` and `au`); RAF-DB `train`, `test`;
BP4D and DISFA `fold1`..`fold3` (subject-exclusive; train on `fold2+fold3`, test on `fold1`,
see `instructions.fold_splits`); GFT the splits of its `splits.json`.

    builder = build("bp4d", source_dir="BP4D", data_dir="tfds", landmarks="bp4d.array_record")
    source = builder.as_data_source(split="fold2+fold3")   # or PipelineConfig(tfds_dir=...)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from emola_jax.config import LANDMARK_DIM
from emola_jax.data import instructions
from emola_jax.data.conversation import BadRecord, conversation_turns
from emola_jax.data.landmarks import check_complete
from emola_jax.data.priors import PriorFeatures
from emola_jax.data.records import read_annotation_list

log = logging.getLogger(__name__)


def features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "id": text(), "source": text(), "subject": text(), "label": text(), "reference": text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "conversations": tfds.features.Sequence({"from": text(), "value": text()}),
        "landmarks": tfds.features.Tensor(shape=(LANDMARK_DIM,), dtype=np.float32),
        "has_landmarks": tfds.features.Tensor(shape=(), dtype=np.bool_),
    })


class InstructionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared writing of instruction records; subclasses say where the records come from.

    `source_dir`: the dataset as downloaded (default: the download config's manual_dir).
    `landmarks`: an ArrayRecord file from `precompute-landmarks` keyed by the records' ids; without
    it FABA records read their official `.npy` and other records are written with
    `has_landmarks=False`. `skip_bad_records`: a missing/truncated image or a malformed record is
    logged and counted instead of stopping the build.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Instruction records with encoded images and 212-value landmark features."}

    def __init__(self, *, source_dir: str | Path | None = None, landmarks: str | Path | None = None,
                 skip_bad_records: bool = False, reader_options: dict | None = None, **kwargs):
        self._source_dir = Path(source_dir) if source_dir is not None else None
        self._landmarks_path = landmarks
        self._prior: PriorFeatures | None = None  # opened when examples are made
        self._skip_bad = skip_bad_records
        self._reader_options = dict(reader_options or {})
        self.skipped: list[tuple[str, str]] = []
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(), features=features())

    def _root(self, dl_manager) -> Path:
        root = self._source_dir or (Path(dl_manager.manual_dir) if dl_manager.manual_dir else None)
        if root is None or not root.is_dir():
            raise FileNotFoundError(f"{self.name}: the dataset folder {root} does not exist (give source_dir)")
        return root

    def _generate_examples(self, records: list[dict], root: Path) -> Iterator[tuple[str, dict]]:
        if self._prior is None:
            self._prior = PriorFeatures.open(self._landmarks_path, BadRecord)
        for record in records:
            rid = str(record.get("id", "?"))
            try:
                yield rid, self._example(rid, record, root)
            except BadRecord as err:
                if not self._skip_bad:
                    raise
                self.skipped.append((rid, str(err)))
                log.warning("%s: skipping %s", self.name, err)

    def _example(self, rid: str, record: dict, root: Path) -> dict:
        turns = record.get("conversations")
        conversation_turns(rid, turns)  # refuse malformed conversations now rather than at training time
        if not isinstance(record.get("image"), str):
            raise BadRecord(f"record {rid} has no image path")
        path = root / record["image"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BadRecord(f"record {rid}: image {path} could not be read: {err.strerror or err}") from None
        problem = check_complete(data)
        if problem is not None:
            raise BadRecord(f"record {rid}: image {path}: {problem}")
        landmarks, has_landmarks = self._landmarks(rid, record, root)
        return {
            "id": rid, "source": str(record.get("source", "")), "subject": str(record.get("subject", "")),
            "label": str(record.get("label", "")), "reference": str(record.get("gpt4", "")),
            "image": data, "conversations": [{"from": t["from"], "value": t["value"]} for t in turns],
            "landmarks": landmarks, "has_landmarks": has_landmarks,
        }

    def _landmarks(self, rid: str, record: dict, root: Path) -> tuple[np.ndarray, bool]:
        feature = self._prior.get(rid, record.get("landmark"), root, optional=True)
        return (feature, True) if feature is not None else (np.zeros(LANDMARK_DIM, np.float32), False)


def read_faba(annotation: Path) -> list[dict]:
    return [r if isinstance(r, dict) else {"id": f"{annotation}#{i}"}
            for i, r in enumerate(read_annotation_list(annotation))]


class FabaInstruct(InstructionBuilder):
    """FABA-Instruct (Li et al., ECCV 2024): `train/train_{task}_anno.json` and
    `eval/eval_{task}_anno.json`, image and landmark paths relative to the dataset folder."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="emotion", description="emotion descriptions"),
        tfds.core.BuilderConfig(name="au", description="action-unit descriptions"),
    ]

    def _split_generators(self, dl_manager):
        root, task = self._root(dl_manager), self.builder_config.name
        return {
            "train": self._generate_examples(read_faba(root / "train" / f"train_{task}_anno.json"), root),
            "test": self._generate_examples(read_faba(root / "eval" / f"eval_{task}_anno.json"), root),
        }


class _TraditionalBuilder(InstructionBuilder, skip_registration=True):
    READER = "rafdb"

    def _split_generators(self, dl_manager):
        root = self._root(dl_manager)
        records = instructions.READERS[self.READER](root, **self._reader_options)
        splits: dict[str, list[dict]] = {}
        for record in records:
            splits.setdefault(record["split"], []).append(record)
        return {name: self._generate_examples(members, root) for name, members in sorted(splits.items())}


class RafDb(_TraditionalBuilder):
    """RAF-DB basic expressions (7 classes) as emotion instructions; splits train/test."""

    READER = "rafdb"


class Bp4d(_TraditionalBuilder):
    """BP4D action units (12) as AU instructions; subject-exclusive splits fold1..fold3."""

    READER = "bp4d"


class Disfa(_TraditionalBuilder):
    """DISFA action units (8, active at intensity >= 2) as AU instructions; splits fold1..fold3."""

    READER = "disfa"


class Gft(_TraditionalBuilder):
    """GFT action units (10) as AU instructions; splits from the dataset's `splits.json`."""

    READER = "gft"


BUILDERS = {"faba_instruct": FabaInstruct, "rafdb": RafDb, "bp4d": Bp4d, "disfa": Disfa, "gft": Gft}


def build(name: str, source_dir: str | Path, data_dir: str | Path, *, config: str | None = None,
          landmarks: str | Path | None = None, skip_bad_records: bool = False, **reader_options):
    """Builds (or reuses) one dataset under `data_dir`; returns the prepared builder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    builder = BUILDERS[name](data_dir=str(data_dir), config=config, source_dir=source_dir, landmarks=landmarks,
                             skip_bad_records=skip_bad_records, reader_options=reader_options)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
