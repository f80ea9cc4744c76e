"""Files and folders that appear whole or not at all: written under a hidden sibling name
(`.NAME.tmp-TOKEN`), made durable, then renamed into place. A name of that form is always an
unfinished write, so a rerun may delete what it finds under it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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
