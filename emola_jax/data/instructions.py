"""Traditional facial-affect datasets turned into FABA-style instruction records.

Each reader returns records in the FABA-Instruct annotation format (`id`, `source`, `image`
relative to the dataset root, `conversations`, `label`, `gpt4`) plus `subject` and `split`, so
the same records feed the tfds builders, `precompute-landmarks` (via `write_annotations`) and the
grain pipeline. Questions are the official evaluation prompts; answers are one templated sentence
that the FABA-Bench scoring rules read back to the label (tested).

Label files, in the layouts the datasets ship:
- RAF-DB: `EmoLabel/list_patition_label.txt` (`train_00001.jpg 5`, labels 1-7 = surprise, fear,
  disgust, happiness, sadness, anger, neutral), images `Image/aligned/train_00001_aligned.jpg`
  (or `Image/original/train_00001.jpg`). Splits: train, test (the file-name prefix).
- BP4D: `AUCoding/AU_OCC/F001_T1.csv`: a header row of column numbers (`0` = frame, `n` = AU n),
  then 0/1 per frame (9 = not coded: such a frame is left out). Splits: fold1..fold3, the
  subject-exclusive folds used since JAA-Net; fold k's protocol trains on the other two.
- DISFA: `ActionUnit_Labels/SN001/SN001_au1.txt` (`frame,intensity` per line); an AU is active at
  intensity >= 2. Splits: fold1..fold3 (subject-exclusive, as for BP4D).
- GFT: `AUCoding/AU_OCC/<video>.csv` in BP4D's layout (the subject is the video name up to the first
  `_`); the partition is `splits.json`, `{"train": [subjects], "test": [subjects]}`.

Image paths come from `image_pattern`, formatted with `subject`, `task`/`video` and `frame` (format
specs work: `{frame:04d}`): frames extracted from videos are named differently by every tool.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from emola_jax.data.labels import AU_QUESTION, AU_SETS, EMOTION_QUESTION, EMOTIONS

AU_NAMES = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser", 6: "cheek raiser",
    7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser", 12: "lip corner puller", 14: "dimpler",
    15: "lip corner depressor", 17: "chin raiser", 20: "lip stretcher", 23: "lip tightener", 24: "lip pressor",
    25: "lips part", 26: "jaw drop", 43: "eyes closed",
}
# RAF-DB's 1..7 in FABA's class ids (happiness 0, sadness 1, surprise 2, anger 3, neutral 4, disgust 5, fear 6)
RAFDB_TO_FABA = {1: 2, 2: 6, 3: 5, 4: 0, 5: 1, 6: 3, 7: 4}
BP4D_FOLDS = (
    ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023", "M008"),
    ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013", "M005"),
    ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
)
DISFA_FOLDS = (
    ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)
DISFA_ACTIVE_INTENSITY = 2


def emotion_answer(label: int) -> str:
    return f"The emotion conveyed by this face is {EMOTIONS[label]}."


def au_answer(active: list[int]) -> str:
    if not active:
        return "No action units are active in this face."
    named = [f"AU{au} ({AU_NAMES[au]})" for au in active]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"The action units active in this face are {listed}."


def _record(source: str, rid: str, image: str, question: str, answer: str, label: str, subject: str,
            split: str) -> dict:
    return {
        "id": rid, "source": source, "image": image, "label": label, "gpt4": answer, "subject": subject,
        "split": split,
        "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
    }


def fold_splits(fold: int) -> tuple[str, str]:
    """`(train, test)` split expressions of fold k (1-3) of a subject-exclusive 3-fold protocol."""
    if fold not in (1, 2, 3):
        raise ValueError(f"fold must be 1, 2 or 3, not {fold}")
    return "+".join(f"fold{k}" for k in (1, 2, 3) if k != fold), f"fold{fold}"


def _fold_of(subject: str, folds: tuple[tuple[str, ...], ...], dataset: str) -> str:
    for k, members in enumerate(folds, start=1):
        if subject in members:
            return f"fold{k}"
    raise ValueError(f"{dataset} subject {subject} is in none of the three standard folds")


def _report_missing(dataset: str, missing: list[str]) -> None:
    if missing:
        logging.getLogger(__name__).warning("%s: %d records skipped, their image is missing (first: %s)",
                                            dataset, len(missing), missing[0])


def _check_image(root: Path, image: str, rid: str, skip_missing: bool, missing: list[str]) -> bool:
    if (root / image).is_file():
        return True
    if not skip_missing:
        raise FileNotFoundError(f"record {rid}: image {root / image} does not exist")
    missing.append(rid)
    return False


def rafdb_records(root: str | Path, *, aligned: bool = True, skip_missing_images: bool = False) -> list[dict]:
    root = Path(root)
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    if not label_file.is_file():
        raise FileNotFoundError(f"RAF-DB label file {label_file} does not exist")
    records, missing = [], []
    for number, line in enumerate(label_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            name, raw = line.split()
            label = RAFDB_TO_FABA[int(raw)]
        except (ValueError, KeyError):
            raise ValueError(f"{label_file}, line {number}: expected '<image> <label 1-7>', got {line!r}") from None
        stem = name.rsplit(".", 1)[0]
        split = stem.split("_")[0]
        if split not in ("train", "test"):
            raise ValueError(f"{label_file}, line {number}: {name} starts with neither train_ nor test_")
        image = f"Image/aligned/{stem}_aligned.jpg" if aligned else f"Image/original/{name}"
        rid = f"RAF-DB_{stem}"
        if _check_image(root, image, rid, skip_missing_images, missing):
            records.append(_record("RAF-DB", rid, image, EMOTION_QUESTION, emotion_answer(label), str(label), "",
                                   split))
    _report_missing("RAF-DB", missing)
    return records


def _occurrence_csv(path: Path, aus: tuple[int, ...]) -> list[tuple[int, list[int] | None]]:
    """`(frame, active AUs)` per row of a BP4D-style occurrence file; None where an AU is not coded."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    frame_col = header.index("0") if "0" in header else header.index("Frame") if "Frame" in header else None
    missing = [au for au in aus if str(au) not in header]
    if frame_col is None or missing:
        raise ValueError(f"{path}: header lacks the frame column or AU column(s) {missing}")
    columns = {au: header.index(str(au)) for au in aus}
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            frame = int(float(row[frame_col]))
            values = {au: int(float(row[c])) for au, c in columns.items()}
        except (ValueError, IndexError):
            raise ValueError(f"{path}, line {number}: not a row of numbers: {row!r}") from None
        coded = all(v in (0, 1) for v in values.values())
        out.append((frame, [au for au in aus if values[au] == 1] if coded else None))
    return out


def _occurrence_records(dataset: str, root: Path, files: list[Path], aus: tuple[int, ...], image_pattern: str,
                        split_of, skip_missing_images: bool) -> list[dict]:
    records, missing = [], []
    for path in files:
        video = path.stem
        subject, _, task = video.partition("_")
        split = split_of(subject)
        for frame, active in _occurrence_csv(path, aus):
            if active is None:
                continue
            image = image_pattern.format(subject=subject, task=task, video=video, frame=frame)
            rid = f"{dataset}_{video}_{frame}"
            if _check_image(root, image, rid, skip_missing_images, missing):
                records.append(_record(dataset, rid, image, AU_QUESTION, au_answer(active),
                                       ", ".join(map(str, active)), subject, split))
    _report_missing(dataset, missing)
    return records


def bp4d_records(root: str | Path, *, image_pattern: str = "images/{subject}/{task}/{frame:04d}.jpg",
                 skip_missing_images: bool = False) -> list[dict]:
    root = Path(root)
    files = sorted((root / "AUCoding" / "AU_OCC").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no BP4D occurrence files in {root / 'AUCoding' / 'AU_OCC'}")
    return _occurrence_records("BP4D", root, files, AU_SETS["bp4d"], image_pattern,
                               lambda s: _fold_of(s, BP4D_FOLDS, "BP4D"), skip_missing_images)


def gft_records(root: str | Path, *, image_pattern: str = "images/{video}/{frame}.jpg",
                skip_missing_images: bool = False) -> list[dict]:
    root = Path(root)
    files = sorted((root / "AUCoding" / "AU_OCC").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no GFT occurrence files in {root / 'AUCoding' / 'AU_OCC'}")
    try:
        partition = json.loads((root / "splits.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"GFT needs {root / 'splits.json'} ({{split: [subjects]}}): {err}") from None
    split_of: dict[str, str] = {}
    for split, subjects in partition.items():
        for subject in subjects:
            if split_of.setdefault(subject, split) != split:
                raise ValueError(f"GFT subject {subject} is in two splits: {split_of[subject]} and {split}")

    def lookup(subject: str) -> str:
        if subject not in split_of:
            raise ValueError(f"GFT subject {subject} is in no split of {root / 'splits.json'}")
        return split_of[subject]

    return _occurrence_records("GFT", root, files, AU_SETS["gft"], image_pattern, lookup, skip_missing_images)


def disfa_records(root: str | Path, *, image_pattern: str = "images/{subject}/{frame}.jpg",
                  skip_missing_images: bool = False) -> list[dict]:
    root = Path(root)
    labels = root / "ActionUnit_Labels"
    subjects = sorted(p.name for p in labels.iterdir() if p.is_dir()) if labels.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"no DISFA subjects in {labels}")
    aus = AU_SETS["disfa"]
    records, missing = [], []
    for subject in subjects:
        split = _fold_of(subject, DISFA_FOLDS, "DISFA")
        intensities: dict[int, dict[int, int]] = {}
        for au in aus:
            path = labels / subject / f"{subject}_au{au}.txt"
            if not path.is_file():
                raise FileNotFoundError(f"DISFA label file {path} does not exist")
            per_frame = {}
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    frame, value = (int(v) for v in line.split(","))
                except ValueError:
                    raise ValueError(f"{path}, line {number}: expected 'frame,intensity', got {line!r}") from None
                per_frame[frame] = value
            intensities[au] = per_frame
        frames = sorted(intensities[aus[0]])
        for au in aus[1:]:
            if sorted(intensities[au]) != frames:
                raise ValueError(f"DISFA {subject}: the AU{au} file codes other frames than the AU{aus[0]} file")
        for frame in frames:
            active = [au for au in aus if intensities[au][frame] >= DISFA_ACTIVE_INTENSITY]
            image = image_pattern.format(subject=subject, frame=frame)
            rid = f"DISFA_{subject}_{frame}"
            if _check_image(root, image, rid, skip_missing_images, missing):
                records.append(_record("DISFA", rid, image, AU_QUESTION, au_answer(active),
                                       ", ".join(map(str, active)), subject, split))
    _report_missing("DISFA", missing)
    return records


READERS = {"rafdb": rafdb_records, "bp4d": bp4d_records, "disfa": disfa_records, "gft": gft_records}


def write_annotations(records: list[dict], path: str | Path) -> Path:
    """Records as a FABA-style annotation JSON (for `precompute-landmarks` and the JSON pipeline source)."""
    path = Path(path)
    path.write_text(json.dumps(records, indent=1))
    return path
