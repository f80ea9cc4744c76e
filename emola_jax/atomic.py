"""Files and folders that appear whole or not at all: written under a hidden sibling name
(`.NAME.tmp-TOKEN`), made durable, then renamed into place. A name of that form is always an
unfinished write, so a rerun may delete what it finds under it."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

STAGING_GLOB = ".*.tmp-*"


def staging_path(path: Path, token: str | None = None) -> Path:
    """The hidden sibling that `path` is written under (`token`: random unless given)."""
    return path.with_name(f".{path.name}.tmp-{token or uuid.uuid4().hex[:12]}")


def fsync_dir(directory: Path) -> None:
    """Makes a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write `path` under; when the block ends without an error it is
    fsynced and renamed to `path`, else removed (an earlier `path` is then left as it was)."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """`path` holds `text`, whole, or keeps what it held."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def not_utf8(err: UnicodeDecodeError) -> str:
    """What a decoding error says, without the codec's wording."""
    return f"byte 0x{err.object[err.start]:02x} is not UTF-8 text (save the file as UTF-8)"


def read_jsonl(path: str | Path, *, appended: bool = False) -> Iterator[tuple[int, Any]]:
    """`(line number, value)` for each non-blank line of the JSON-lines file `path`; a line that
    is not UTF-8 JSON is a ValueError naming the file and line.

    `appended`: a file the project appends to as it works (predictions, metrics, logs). A missing
    file then holds nothing yet, and a last line without its newline is an append a kill cut
    short: it is left out (`cut_torn_line` removes it before the next append)."""
    path = Path(path)
    if appended and not path.exists():
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if appended and not line.endswith(b"\n"):
                return
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {number}: {not_utf8(err)}") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None


def cut_torn_line(path: str | Path) -> None:
    """Cuts off a last line without its newline (an append a kill cut short), so that the next
    append starts a line of its own."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def make_folder(path: str | Path) -> Path:
    """Creates the folder `path` (and its parents) unless it exists; a file where the folder or one
    of its parents should be is an error naming that file, not an errno."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        where = "" if blocker == path else f" for {path}"
        raise ValueError(f"{blocker} is a file, where a folder is needed{where}") from None
    return path


STAGING_LOCK = ".staging.lock"
_UNLOCKED_GRACE_S = 600.0  # a staging folder with no lock yet is a run between mkdir and flock


def lock_staging(folder: Path) -> int:
    """Creates the lock file of the staging folder `folder` and holds an exclusive `flock` on it;
    returns its descriptor. The kernel drops the lock when the process dies (even by `kill -9`),
    which is how `remove_dead_staging` tells a dead run's leftovers from a live run's folder."""
    fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_dead_staging(path: str | Path) -> list[Path]:
    """Removes the staging folders of `path` (`.NAME.tmp-*`) that no live process holds the lock
    of; returns them. A folder without a lock file is removed only once it is
    `_UNLOCKED_GRACE_S` old, so a run that has just created its folder keeps it."""
    path = Path(path).absolute()
    removed = []
    for folder in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder / STAGING_LOCK, os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - folder.stat().st_mtime > _UNLOCKED_GRACE_S:
                    shutil.rmtree(folder)
                    removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live run (or a filesystem without locks: keep it)
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def check_apart(label: str, out: str | Path, inputs: Mapping[str, Any], *,
                writes: Collection[str] | None = None) -> None:
    """Refuses an output `out` that is one of a command's inputs, lies inside one, or contains one,
    so that no command deletes or overwrites what it reads. `inputs` maps a name for the message
    to a path, a list of paths, or None. `writes`: for a command that adds named files to an
    existing folder `out` (evaluate's reports), an input inside `out` is refused only under one of
    those names."""
    target = Path(out).absolute().resolve()
    for name, value in inputs.items():
        for given in [] if value is None else [value] if isinstance(value, (str, os.PathLike)) else value:
            source = Path(given).absolute().resolve()
            if target == source or target.is_relative_to(source):
                raise ValueError(f"{label} {out} must lie outside {name} {given} (and not contain it)")
            overwritten = writes is None or (source.parent == target and source.name in writes)
            if source.is_relative_to(target) and overwritten:
                raise ValueError(f"{label} {out} holds {name} {given}, which the command would overwrite; "
                                 f"give another {label}")
