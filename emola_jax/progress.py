"""Progress that reads on a terminal and in a log alike.

On a terminal: tqdm's bar, redrawn in place. Written to a file or a pipe (`run.py demo > log 2>&1`,
a cluster's job log): the same bar as whole lines, one at its start, at most one per
`LOG_INTERVAL_S` seconds, and one at its end, so a log holds lines rather than carriage returns.
Stage lines (`say`) go to the same stream, stderr, leaving stdout to results.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """The stream tqdm writes to away from a terminal: each redraw becomes one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(*, enabled: bool = True, **tqdm_args) -> tqdm:
    """A tqdm bar on stderr (`tqdm_args`: total, desc, unit, initial, ...); a disabled one, which
    draws nothing, where not `enabled`."""
    if not enabled:
        return tqdm(disable=True, **tqdm_args)
    if sys.stderr.isatty():
        return tqdm(file=sys.stderr, **tqdm_args)
    return tqdm(file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, ascii=True, ncols=100, **tqdm_args)


def say(text: str) -> None:
    """One line about what the command does now, on stderr beside the bars."""
    print(text, file=sys.stderr, flush=True)


def _silent(text: str) -> None:
    """`say` for a caller that asked for no progress."""


def stage_lines(enabled: bool):
    """`say`, or where not `enabled` a function that prints nothing."""
    return say if enabled else _silent
