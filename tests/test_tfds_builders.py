"""Instruction records from the traditional datasets' label files, and the tfds builders' ArrayRecord output:
labels read from fake datasets in the standard layouts, answers that the FABA-Bench scoring reads back
to the label, subject-exclusive folds, and the written examples equal to their sources."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from emola_jax.data import instructions, landmark_store
from emola_jax.data import tfds_builders as builders
from emola_jax.data.labels import AU_SETS, EMOTIONS
from emola_jax.eval import scoring

RAF_NAMES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (24, 20, 3), dtype=np.uint8))


def fake_rafdb(root: Path) -> dict[str, int]:
    labels = {"train_00001": 4, "train_00002": 1, "train_00003": 7, "train_00004": 3,
              "test_0001": 5, "test_0002": 6, "test_0003": 2}
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text(
        "".join(f"{stem}.jpg {label}\n" for stem, label in labels.items()))
    for i, stem in enumerate(labels):
        write_image(root / "Image" / "aligned" / f"{stem}_aligned.jpg", i)
    return labels


BP4D_HEADER = [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 17, 23, 24, 27]


def fake_bp4d(root: Path, rng: np.random.Generator) -> dict[str, set[int] | None]:
    """Occurrence files for subjects from all three folds; returns the expected AUs per record id
    (None: a target AU is coded 9, so the frame is left out)."""
    expected = {}
    (root / "AUCoding" / "AU_OCC").mkdir(parents=True)
    for subject, task in [("F001", "T1"), ("F001", "T2"), ("M007", "T1"), ("M011", "T3"), ("F007", "T1")]:
        rows = [",".join(map(str, BP4D_HEADER))]
        for frame in range(10, 14):
            values = rng.integers(0, 2, len(BP4D_HEADER) - 1)
            if frame == 12:
                values[BP4D_HEADER.index(5) - 1] = 9  # AU5 is not a BP4D target: the frame stays
            if frame == 13 and subject == "F001":
                values[BP4D_HEADER.index(12) - 1] = 9  # a target AU not coded: the frame is left out
            rows.append(",".join(map(str, [frame, *values])))
            active = {au for au, v in zip(BP4D_HEADER[1:], values, strict=True) if v == 1}
            targets = AU_SETS["bp4d"]
            coded = all(values[BP4D_HEADER.index(au) - 1] in (0, 1) for au in targets)
            expected[f"BP4D_{subject}_{task}_{frame}"] = (active & set(targets)) if coded else None
            write_image(root / "images" / subject / task / f"{frame:04d}.jpg", frame)
        (root / "AUCoding" / "AU_OCC" / f"{subject}_{task}.csv").write_text("\n".join(rows) + "\n")
    return expected


def fake_disfa(root: Path, rng: np.random.Generator) -> dict[str, set[int]]:
    expected = {}
    for subject in ("SN001", "SN013", "SN003", "SN002"):
        folder = root / "ActionUnit_Labels" / subject
        folder.mkdir(parents=True)
        intensities = {au: rng.integers(0, 6, 5) for au in (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)}
        for au, values in intensities.items():
            (folder / f"{subject}_au{au}.txt").write_text("".join(f"{f},{v}\n" for f, v in enumerate(values, 1)))
        for frame in range(1, 6):
            expected[f"DISFA_{subject}_{frame}"] = {au for au in AU_SETS["disfa"]
                                                    if intensities[au][frame - 1] >= 2}
            write_image(root / "images" / subject / f"{frame}.jpg", frame)
    return expected


def fake_gft(root: Path) -> dict[str, set[int]]:
    header = [1, 2, 4, 6, 10, 12, 14, 15, 23, 24]
    (root / "AUCoding" / "AU_OCC").mkdir(parents=True)
    expected = {}
    for video, rows in {"001_a": [[1, 0, 0, 1, 0, 1, 0, 0, 0, 0], [0] * 10],
                        "002_b": [[0, 1, 1, 0, 0, 0, 0, 0, 1, 1]]}.items():
        text = ["Frame," + ",".join(map(str, header))]
        for frame, values in enumerate(rows, start=1):
            text.append(",".join(map(str, [frame, *values])))
            expected[f"GFT_{video}_{frame}"] = {au for au, v in zip(header, values, strict=True) if v}
            write_image(root / "images" / video / f"{frame}.jpg", frame)
        (root / "AUCoding" / "AU_OCC" / f"{video}.csv").write_text("\n".join(text) + "\n")
    (root / "splits.json").write_text(json.dumps({"train": ["001"], "test": ["002"]}))
    return expected


def au_set(label: str) -> set[int]:
    return {int(a) for a in label.split(", ") if a}


def test_rafdb_records(tmp_path):
    labels = fake_rafdb(tmp_path)
    records = instructions.rafdb_records(tmp_path)
    assert len(records) == 7
    for record in records:
        stem = record["id"].removeprefix("RAF-DB_")
        name = RAF_NAMES[labels[stem]]
        assert EMOTIONS[int(record["label"])] == name
        assert record["split"] == stem.split("_")[0]
        assert record["image"] == f"Image/aligned/{stem}_aligned.jpg"
        answer = record["conversations"][1]["value"]
        assert scoring.emotion_of(answer) == int(record["label"]) == scoring.emotion_label(record["label"])
        assert record["conversations"][0]["value"] == "<image>\nWhat emotions are conveyed by this face?"


def test_bp4d_folds_are_subject_exclusive(tmp_path):
    expected = fake_bp4d(tmp_path, np.random.default_rng(0))
    records = instructions.bp4d_records(tmp_path)
    kept = {k: v for k, v in expected.items() if v is not None}
    assert {r["id"] for r in records} == set(kept)
    for record in records:
        assert au_set(record["label"]) == kept[record["id"]]
        assert scoring.aus_of(record["conversations"][1]["value"]) == {str(a) for a in kept[record["id"]]}
        assert (tmp_path / record["image"]).is_file()
    folds = {}
    for record in records:
        folds.setdefault(record["split"], set()).add(record["subject"])
    assert folds == {"fold1": {"F001", "M007"}, "fold2": {"M011"}, "fold3": {"F007"}}
    for k, subjects in folds.items():
        assert subjects <= set(instructions.BP4D_FOLDS[int(k[-1]) - 1])
    assert instructions.fold_splits(1) == ("fold2+fold3", "fold1")


def test_disfa_threshold_and_folds(tmp_path):
    expected = fake_disfa(tmp_path, np.random.default_rng(1))
    records = instructions.disfa_records(tmp_path)
    assert {r["id"]: au_set(r["label"]) for r in records} == expected
    assert {r["subject"]: r["split"] for r in records} == {"SN001": "fold1", "SN002": "fold1", "SN013": "fold2",
                                                           "SN003": "fold3"}
    (tmp_path / "ActionUnit_Labels" / "SN099").mkdir()
    with pytest.raises(ValueError, match="SN099 is in none of the three standard folds"):
        instructions.disfa_records(tmp_path)


def test_gft_and_missing_images(tmp_path):
    expected = fake_gft(tmp_path)
    records = instructions.gft_records(tmp_path)
    assert {r["id"]: au_set(r["label"]) for r in records} == expected
    assert {r["id"]: r["split"] for r in records} == {"GFT_001_a_1": "train", "GFT_001_a_2": "train",
                                                      "GFT_002_b_1": "test"}
    assert records[1]["conversations"][1]["value"] == "No action units are active in this face."
    (tmp_path / "images" / "001_a" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="GFT_001_a_2"):
        instructions.gft_records(tmp_path)
    assert len(instructions.gft_records(tmp_path, skip_missing_images=True)) == 2


def test_bp4d_builder_writes_array_record_folds(tmp_path):
    source = tmp_path / "BP4D"
    expected = fake_bp4d(source, np.random.default_rng(2))
    records = instructions.bp4d_records(source)
    rng = np.random.default_rng(3)
    features = {r["id"]: rng.standard_normal(212).astype(np.float32) for r in records}
    landmark_store.write_file(tmp_path / "bp4d.array_record", features.items())
    builder = builders.build("bp4d", source, tmp_path / "tfds", landmarks=tmp_path / "bp4d.array_record")
    version_dir = Path(builder.data_dir)
    assert sorted(p.name for p in version_dir.glob("*.array_record*")) == [
        f"bp4d-fold{k}.array_record-00000-of-00001" for k in (1, 2, 3)]
    by_id = {r["id"]: r for r in records}
    for split in ("fold1", "fold2", "fold3"):
        source_split = builder.as_data_source(split=split)
        ids = {source_split[i]["id"].decode() for i in range(len(source_split))}
        assert ids == {r["id"] for r in records if r["split"] == split}
    train = builder.as_data_source(split=instructions.fold_splits(1)[0])
    for i in range(len(train)):
        example = train[i]
        rid = example["id"].decode()
        record = by_id[rid]
        assert record["split"] != "fold1" and expected[rid] == au_set(example["label"].decode())
        assert example["image"] == (source / record["image"]).read_bytes()
        np.testing.assert_array_equal(example["landmarks"], features[rid])
        assert bool(example["has_landmarks"])
        assert [v.decode() for v in example["conversations"]["value"]] == [t["value"] for t in
                                                                           record["conversations"]]


def fake_faba(root: Path, count: int = 6) -> list[dict]:
    rng = np.random.default_rng(4)
    (root / "landmarks").mkdir(parents=True)
    records = {"train": [], "eval": []}
    for i in range(count):
        split = "train" if i < count - 2 else "eval"
        write_image(root / "images" / f"{i}.jpg", i)
        np.save(root / "landmarks" / f"{i}.npy", rng.standard_normal((1, 212)).astype(np.float32))
        record = {"id": f"faba_{i}", "source": "AffectNet", "image": f"images/{i}.jpg",
                  "landmark": f"landmarks/{i}.npy",
                  "conversations": [{"from": "human", "value": "What emotions are conveyed by this face?\n<image>"},
                                    {"from": "gpt", "value": f"Answer {i}."}]}
        if split == "eval":
            record.update(label=i % 7, gpt4=f"Reference {i}.")
        records[split].append(record)
    for split, items in records.items():
        (root / split).mkdir()
        (root / split / f"{split}_emotion_anno.json").write_text(json.dumps(items))
    return records["train"] + records["eval"]


def test_faba_builder_and_bad_records(tmp_path):
    source = tmp_path / "FABA"
    records = fake_faba(source)
    builder = builders.build("faba_instruct", source, tmp_path / "tfds", config="emotion")
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {"train": 4, "test": 2}
    test = builder.as_data_source(split="test")
    got = {test[i]["id"].decode(): test[i] for i in range(len(test))}
    for record in records[4:]:
        example = got[record["id"]]
        assert example["reference"].decode() == record["gpt4"] and example["label"].decode() == str(record["label"])
        np.testing.assert_array_equal(example["landmarks"], np.load(source / record["landmark"]).reshape(-1))
        assert example["image"] == (source / record["image"]).read_bytes()

    broken = source / "images" / "1.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ValueError, match="record faba_1: image .* truncated JPEG"):
        builders.build("faba_instruct", source, tmp_path / "tfds2", config="emotion")
    skipping = builders.build("faba_instruct", source, tmp_path / "tfds3", config="emotion", skip_bad_records=True)
    assert [rid for rid, _ in skipping.skipped] == ["faba_1"]
    assert skipping.info.splits["train"].num_examples == 3
