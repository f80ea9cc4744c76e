"""`run.py precompute-priors` (and `precompute-landmarks`, its 2d106det case): the prior feature of
every annotated image, into one ArrayRecord file whose footer names the prior and its width.

Images are decoded (and, for the dlib priors, their shape points found) by a thread pool a few
batches ahead of the batched model call. Finished features go to numbered part files beside the
output (each written atomically); at the end the previous output and the parts are merged into
the output, again atomically, and the parts removed. A rerun skips every id already in the output
or a part, so a killed run loses at most the features not yet in a part; it also removes what a
run killed during the merge leaves: the merged file's temporary, or parts already merged into the
output. An output or part of another prior or width is refused. A record's `bbox` is the face box
of the priors and recipes that take one (all but the official 2d106det recipe); without it the
face is the whole image. An unreadable, truncated, empty or oversized image, a face the prior
cannot process (a box wholly outside its image) or a feature with NaN or infinite values (a broken
model file) is one line (id, path, reason) of `<out stem>.errors.jsonl` and is not stored; a run
where no input at all gave a feature is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from emola_jax.atomic import STAGING_GLOB, make_folder, staging_path
from emola_jax.config import is_official
from emola_jax.data import landmark_store, landmarks, priors
from emola_jax.data.priors import read_npy
from emola_jax.data.records import read_annotation_list
from emola_jax.progress import bar as progress_bar
from emola_jax.settings import Recipe, check_choice


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    path: Path
    bbox: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    written: int
    skipped: int
    failed: int
    out: Path
    errors: Path
    what: str = "landmarks"  # the prior's name, or "landmarks" for 2d106det

    def line(self) -> str:
        text = f"{self.what}: written {self.written}, skipped {self.skipped} (already done), failed {self.failed}"
        if self.failed:
            text += f" (listed in {self.errors})"
        return text + f" -> {self.out}"


def errors_path(out: str | Path) -> Path:
    """`FEATURES.array_record` -> `FEATURES.errors.jsonl`, beside it."""
    return Path(out).with_suffix(".errors.jsonl")


def read_jobs(annotations: Iterable[str | Path], root: str | Path, key: str = "image") -> list[Job]:
    """One job per distinct record id, `key` ("image" or "landmark") resolved under `root`.
    A record without an id or path, or one id naming two different files, is an error."""
    jobs: dict[str, Job] = {}
    for annotation in annotations:
        for index, record in enumerate(read_annotation_list(annotation)):
            if not isinstance(record, dict) or "id" not in record or not isinstance(record.get(key), str):
                rid = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
                raise ValueError(f"{annotation}: record {rid} has no {key!r} path")
            bbox = record.get("bbox")
            if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4
                                         and all(isinstance(v, (int, float)) for v in bbox)
                                         and bbox[2] > bbox[0] and bbox[3] > bbox[1]):
                raise ValueError(f"{annotation}: record {record['id']}: bbox must be [x1, y1, x2, y2] with x2 > x1, "
                                 f"y2 > y1")
            job = Job(str(record["id"]), Path(root) / record[key], tuple(map(float, bbox)) if bbox else None)
            seen = jobs.setdefault(job.id, job)
            if seen != job:
                raise ValueError(f"record id {job.id} names two different inputs: {seen.path} and {job.path}")
    return list(jobs.values())


class _Output:
    """Part files of finished features, merged into `out` at the end."""

    def __init__(self, out: Path, part_size: int, info: landmark_store.StoreInfo):
        self.out, self.part_size, self.info = out, part_size, info
        self.parts_dir = out.with_name(out.name + ".parts")
        self.pending: list[tuple[str, np.ndarray]] = []
        # a merge killed before its rename leaves the merged file's temporary beside `out`
        for stale in out.parent.glob(staging_path(out.with_name(glob.escape(out.name)), "*").name):
            stale.unlink()
        if self.parts_dir.is_dir():  # a part killed while being written is only ever a hidden temporary
            for stale in self.parts_dir.glob(STAGING_GLOB):
                stale.unlink()
        for path in ([out] if out.exists() else []) + self.parts():
            found = landmark_store.read_info(path)
            found.check(path, info.prior, info.dim)
            if found.recipe not in (None, info.recipe):  # one file, one recipe: features would not compare
                raise ValueError(f"{path} holds {found.prior} features of the {found.recipe} recipe, not "
                                 f"{info.recipe}")
        out_ids = {key for key, _ in self.iter_file(out)} if out.exists() else set()
        part_ids = {part: {key for key, _ in self.iter_file(part)} for part in self.parts()}
        self._drop_merged_parts({part: ids for part, ids in part_ids.items() if ids & out_ids}, out_ids)
        self.done: set[str] = out_ids.union(*(ids for part, ids in part_ids.items() if part.exists()))

    def _drop_merged_parts(self, overlapping: dict[Path, set[str]], out_ids: set[str]) -> None:
        """Removes the parts a merge killed after its rename left behind: every record of such a
        part is already in `out`, with the same values. Any other overlap is an error naming it."""
        if not overlapping:
            return
        wanted = set().union(*overlapping.values())
        merged = {key: feature for key, feature in self.iter_file(self.out) if key in wanted}
        for part, ids in overlapping.items():
            missing = sorted(ids - out_ids)
            if missing:
                raise ValueError(f"{part} holds records that are in {self.out} and records that are not (e.g. "
                                 f"{missing[0]}), so it is not a merged part; remove {part} or {self.out}")
            for key, feature in self.iter_file(part):
                if not np.array_equal(feature, merged[key], equal_nan=True):
                    raise ValueError(f"record id {key} has one feature in {self.out} and another in {part}; "
                                     "remove the wrong file")
        for part in overlapping:
            part.unlink()

    def iter_file(self, path: Path):
        """A file of this run's prior and width (another is refused, naming it)."""
        return landmark_store.iter_file(path, self.info.prior, self.info.dim)

    def write_file(self, path: Path, items) -> None:
        landmark_store.write_file(path, items, prior=self.info.prior, dim=self.info.dim, recipe=self.info.recipe)

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.array_record")) if self.parts_dir.is_dir() else []

    def add(self, record_id: str, feature: np.ndarray) -> None:
        self.pending.append((record_id, feature))
        if len(self.pending) >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = self.parts()
        number = int(existing[-1].name.split("-")[1].split(".")[0]) + 1 if existing else 0
        self.write_file(self.parts_dir / f"part-{number:05d}.array_record", self.pending)
        self.pending = []

    def finalise(self) -> None:
        self.flush()
        parts = self.parts()
        if not parts and self.out.exists():
            shutil.rmtree(self.parts_dir, ignore_errors=True)  # emptied by _drop_merged_parts, or by a kill
            return
        sources = ([self.out] if self.out.exists() else []) + parts

        def merged() -> Iterator[tuple[str, np.ndarray]]:
            seen: set[str] = set()
            for source in sources:
                for key, feature in self.iter_file(source):
                    if key in seen:
                        raise ValueError(f"record id {key} is in more than one of {', '.join(map(str, sources))}")
                    seen.add(key)
                    yield key, feature

        self.write_file(self.out, merged())
        shutil.rmtree(self.parts_dir, ignore_errors=True)  # a kill before or during this: see _drop_merged_parts


class NotFinite(str):
    """The reason a computed feature is refused for NaN or infinite values (not stored)."""


class _ErrorLog:
    def __init__(self, path: Path):
        self.path, self.count, self.file, self.first = path, 0, None, ""
        self.not_finite = 0

    def add(self, job: Job, reason: str) -> None:
        self.not_finite += isinstance(reason, NotFinite)
        if self.file is None:
            self.file = open(self.path, "w")
            self.first = reason
        self.file.write(json.dumps({"id": job.id, "path": str(job.path), "reason": reason}) + "\n")
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        elif self.path.exists():
            self.path.unlink()  # the previous run's failures were retried and none is left


def _run(jobs: list[Job], out: str | Path, compute: Callable[[list[Job]], Iterator[tuple[Job, np.ndarray | str]]],
         part_size: int, progress: bool, inputs: str, info: landmark_store.StoreInfo) -> Summary:
    """`inputs`: what the jobs read ("images"), for the error when none of them could be read;
    `info`: the prior, width and recipe the output's footer gets."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; the output is the ArrayRecord file to write, e.g. "
                         f"{out / 'features.array_record'}")
    make_folder(out.parent)
    output = _Output(out, part_size, info)
    todo = [job for job in jobs if job.id not in output.done]
    errors = _ErrorLog(errors_path(out))
    written = 0
    what = "landmarks" if is_official(info.prior) else info.prior
    try:
        with progress_bar(total=len(todo), unit="img", desc=what, enabled=progress) as bar:
            for job, result in compute(todo):
                if isinstance(result, str):
                    errors.add(job, result)
                else:
                    output.add(job.id, result)
                    written += 1
                bar.update(1)
    finally:  # whatever stops the loop, features already computed reach a part file
        errors.close()
        output.flush()
    if jobs and errors.count == len(jobs):  # e.g. a mistyped root or a broken model: an empty output would hide it
        failed = "gave a feature" if errors.not_finite else "could be read"
        raise ValueError(f"none of the {len(jobs)} {inputs} {failed} ({errors.first}); each reason is listed "
                         f"in {errors.path}")
    output.finalise()
    return Summary(written, len(jobs) - len(todo), errors.count, out, errors.path, what)


def _prepare(extractor: priors.Extractor, job: Job):
    """What the extractor's `finish` needs of one image, or the reason it has none (a string)."""
    # deferred: start-up time (cv2)
    import cv2

    try:
        bgr = landmarks.read_bgr(job.path)
        return extractor.prepare(bgr, job.bbox if extractor.takes_box else None, f"record {job.id} ({job.path})")
    except (ValueError, cv2.error) as err:
        return str(err)


def precompute_priors(
    annotations: str | Path | list[str | Path], images_root: str | Path, out: str | Path, *,
    prior: str = "2d106det", onnx: str | Path | None = None, recipe: str | None = None, batch_size: int = 32,
    threads: int | None = None, part_size: int = 1024, progress: bool = True,
) -> Summary:
    """Features of prior `prior` (`data/priors.py`; `onnx` and `recipe` as `priors.open_extractor`
    takes them) of every distinct record id of `annotations` into the ArrayRecord file `out`."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    annotations = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
    jobs = read_jobs(annotations, images_root)
    extractor = priors.open_extractor(prior, onnx=onnx, recipe=recipe)
    threads = threads or min(8, os.cpu_count() or 1)

    def compute(todo: list[Job]) -> Iterator[tuple[Job, np.ndarray | str]]:
        queue: collections.deque[tuple[Job, Future]] = collections.deque()
        pending = iter(todo)
        with ThreadPoolExecutor(threads) as pool:
            def refill() -> None:  # decode at most 3 batches ahead: memory stays bounded
                while len(queue) < 3 * batch_size:
                    job = next(pending, None)
                    if job is None:
                        return
                    queue.append((job, pool.submit(_prepare, extractor, job)))

            refill()
            while queue:
                batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
                refill()
                results = [(job, future.result()) for job, future in batch]
                good = [r for _, r in results if not isinstance(r, str)]
                features = iter(extractor.finish(good) if good else ())
                for job, result in results:
                    if isinstance(result, str):
                        yield job, result
                        continue
                    feature = next(features)
                    problem = extractor.not_finite(feature, f"record {job.id} ({job.path})")
                    yield job, feature if problem is None else NotFinite(problem)

    info = landmark_store.StoreInfo(extractor.prior.name, extractor.prior.dim, extractor.recipe)
    return _run(jobs, out, compute, part_size, progress, "images", info)


def precompute_landmarks(
    annotations: str | Path | list[str | Path], images_root: str | Path, onnx: str | Path, out: str | Path, *,
    recipe: str = "official", batch_size: int = 32, threads: int | None = None, part_size: int = 1024,
    progress: bool = True,
) -> Summary:
    """The 2d106det case of `precompute_priors`: landmark features from the graph `onnx`."""
    check_choice(recipe, Recipe, "recipe")
    return precompute_priors(annotations, images_root, out, prior="2d106det", onnx=onnx, recipe=recipe,
                             batch_size=batch_size, threads=threads, part_size=part_size, progress=progress)


def import_npy(
    annotations: str | Path | list[str | Path], landmarks_root: str | Path, out: str | Path, *,
    part_size: int = 4096, progress: bool = True,
) -> Summary:
    """An official `landmarks/*.npy` tree (records' `landmark` paths, relative to `landmarks_root`)
    into the same ArrayRecord format."""
    annotations = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
    jobs = read_jobs(annotations, landmarks_root, key="landmark")

    def compute(todo: list[Job]) -> Iterator[tuple[Job, np.ndarray | str]]:
        for job in todo:
            try:
                feature = read_npy(job.path)
            except ValueError as err:
                yield job, str(err)
                continue
            if not np.isfinite(feature).all():
                yield job, NotFinite("landmark file holds NaN or infinite values")
            else:
                yield job, feature

    return _run(jobs, out, compute, part_size, progress, "landmark files",
                landmark_store.StoreInfo(recipe="official"))
