"""FABA-Instruct / FABA-Bench annotation files, as the official release writes them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from emola_jax.atomic import not_utf8


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    id: str
    image: Path
    landmark: Path | None
    question: str
    reference: str
    label: int | str


def line_of(data: bytes, offset: int) -> int:
    """The 1-based line of `data` that byte `offset` is on."""
    return data.count(b"\n", 0, offset) + 1


def read_annotation_list(path: str | Path) -> list:
    """The records of an annotation JSON file; a file that cannot be read, is not UTF-8 JSON or is
    not a list is an error naming it (and the line, where one is at fault)."""
    try:
        data = Path(path).read_bytes()
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"annotation file {path}, line {line_of(data, err.start)}: {not_utf8(err)}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"annotation file {path} could not be read: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a list of records")
    return records


def read_eval_records(
    annotations: str | Path, images_root: str | Path | None = None, prompt: str | None = None
) -> list[EvalRecord]:
    """Records of an `eval_{au,emotion}_anno.json`; paths are relative to `images_root`
    (default: the folder of the annotation file). `prompt`, when given, replaces every record's
    own question. A malformed record is an error naming its id."""
    annotations = Path(annotations)
    root = Path(images_root) if images_root is not None else annotations.parent
    raw = read_annotation_list(annotations)
    records, seen = [], set()
    for index, item in enumerate(raw):
        rid = str(item.get("id", f"#{index}")) if isinstance(item, dict) else f"#{index}"
        try:
            conversations = item["conversations"]
            question = next(turn["value"] for turn in conversations if turn["from"] == "human")
            reference = item.get("gpt4") or next(turn["value"] for turn in conversations if turn["from"] == "gpt")
            record = EvalRecord(
                id=str(item["id"]), image=root / item["image"],
                landmark=root / item["landmark"] if item.get("landmark") else None,
                question=prompt or question, reference=reference, label=item["label"],
            )
        except (KeyError, TypeError, StopIteration) as err:
            raise ValueError(f"{annotations}: record {rid} is malformed (missing {err})") from None
        if record.id in seen:
            raise ValueError(f"{annotations}: record id {record.id} appears twice")
        seen.add(record.id)
        records.append(record)
    return records
