"""Joining a multi-process run, and leaving it cleanly when a peer is lost.

One home for training, evaluation and generation alike. A process that dies (`kill -9`, a lost
host) leaves the others blocked in a collective that never completes: jax's own heartbeat check
ends them only after its timeout, with an abort. `PeerWatch` instead names the lost process in
one sentence and ends this one within `peer_timeout` seconds; the rerun resumes from what was
finished. The one case it cannot phrase is a lost process 0: the coordination service lives in
it, and jax's client ends the others at once with its own fatal log (no callback can be given).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

_KEY = "emola_jax/heartbeat/"
_GONE = "emola_jax/gone/"  # written by a process that printed its last words, just before it exits
DONE, FAILED = "done", "failed: "
RERUN = ("Rerun the same command on every process: training resumes from the last complete checkpoint, "
         "evaluation after the last written prediction")
_watch: PeerWatch | None = None


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    auto: bool = False, peer_timeout: float = 60.0,
) -> None:
    """Joins a multi-process run before any device is touched: explicitly (coordinator address,
    process count and id, e.g. several hosts or several processes on one machine), or `auto`
    (TPU pods, SLURM and other clusters jax detects). CPU processes talk through gloo. A process
    that stops beating for `peer_timeout` seconds ends the others (`PeerWatch`)."""
    global _watch
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if peer_timeout <= 0:
        raise ValueError(f"the peer timeout must be positive, not {peer_timeout}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not auto and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    heartbeat = max(100, int(2 * peer_timeout))  # jax's own check must not end a process before PeerWatch does
    if auto:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    else:
        # explicit: no cluster detection, which under SLURM would give each process one device
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   cluster_detection_method="deactivate", heartbeat_timeout_seconds=heartbeat)
    if jax.process_count() > 1:
        _watch = PeerWatch(peer_timeout)


def is_multiprocess() -> bool:
    return _watch is not None


def finish() -> None:
    """Tells the other processes that this one ended its work (it is not lost)."""
    if _watch is not None:
        _watch.finish(DONE)


def leave_after_error(error: BaseException) -> None:
    """Ends this process of a multi-process run that stopped with `error`, with one sentence.

    The others read the error and stop at once, naming this process, instead of waiting for a
    collective that never completes. When `error` comes from a peer that died (a collective that
    failed), the sentence names the lost process instead: this waits until every peer has ended
    or one has been silent for the peer timeout. Process 0 holds the coordination service, so it
    leaves last. Exits without jax's shutdown, which would wait for every process."""
    assert _watch is not None, "not a multi-process run"
    message = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    if not _watch.finish(FAILED + message):  # the watch already said why (the error followed from it)
        threading.Event().wait()  # ... and ends the process
    lost = _watch.wait_for_peers(until_lost=True)
    print(f"error: {lost or message}", file=sys.stderr, flush=True)
    _watch.exit()


class PeerWatch:
    """A daemon thread that writes this process's beat count to the coordination service's
    key-value store every `interval` seconds and reads the others' (one directory read). A peer
    whose count stays the same for `timeout` seconds, or a coordinator that no longer answers, is
    lost; a peer that wrote FAILED stopped with an error. Either way the sentence naming it goes
    to stderr and this process exits with status 1 (without jax's shutdown, which would wait for
    the lost process), after writing FAILED itself so that the others do not wait for it."""

    def __init__(self, timeout: float, interval: float = 1.0):
        from jax._src import distributed  # the client jax.distributed.initialize made

        self.client = distributed.global_state.client
        self.timeout, self.interval = timeout, interval
        self.me, self.count = jax.process_index(), jax.process_count()
        start = time.monotonic()
        self.last = {p: (None, start) for p in range(self.count) if p != self.me}  # value seen, when it changed
        self.beats = 0
        self.lost: set[int] = set()
        self.finished = threading.Event()
        self.leaving = threading.Event()  # the watch found a lost or failed peer and ends this process
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="emola_jax-peer-watch", daemon=True).start()

    def _run(self) -> None:
        while not self.finished.wait(self.interval):
            with self.lock:
                if self.finished.is_set():
                    return
                self._beat()
                sentence = self._verdict(report_errors=True)[0]
                if sentence is None:
                    continue
                self.leaving.set()
                self._set(FAILED + sentence)
            print(f"\nerror: {sentence}", file=sys.stderr, flush=True)  # on a line of its own, after any bar
            self.exit()

    def exit(self) -> None:
        """Exits with status 1 once this process's words are out. Process 0 holds the coordination
        service, whose end would abort the others mid-sentence: it leaves after them (or after
        `timeout` seconds)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.me == 0:
            waiting_for = set(self.last) - self.lost
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and not waiting_for <= set(self._read(_GONE)):
                time.sleep(0.1)
        else:
            self._set("1", _GONE)
        os._exit(1)

    def _set(self, value: str, prefix: str = _KEY) -> bool:
        try:
            self.client.key_value_set(f"{prefix}{self.me}", value, allow_overwrite=True)
            return True
        except Exception:  # noqa: BLE001 - any failure here means the service is gone
            return False

    def _read(self, prefix: str) -> dict[int, str]:
        """Every process's value under `prefix` (one read); raises when the service is gone."""
        return {int(key.rsplit("/", 1)[1]): value for key, value in self.client.key_value_dir_get(prefix)}

    def _beat(self) -> None:
        self.beats += 1
        self._set(str(self.beats))

    def _verdict(self, report_errors: bool) -> tuple[str | None, bool]:
        """`(sentence naming a lost peer, or with `report_errors` one that failed; whether every
        peer has ended)`."""
        try:
            values = self._read(_KEY)
        except Exception:  # noqa: BLE001 - the directory lives in process 0's coordination service
            return self._sentence(0, "the coordinator no longer answers"), False
        now, ended = time.monotonic(), True
        for peer, (seen, since) in self.last.items():
            value = values.get(peer)
            if value == DONE or (value or "").startswith(FAILED):
                if value != DONE and report_errors:
                    return (f"process {peer} of {self.count} stopped ({value[len(FAILED):]}); "
                            f"process {self.me} stops too"), True
                continue
            ended = False
            if value != seen:
                self.last[peer] = (value, now)
            elif now - since > self.timeout:
                self.lost.add(peer)
                return self._sentence(peer, f"no sign of life for {now - since:.0f} s"), False
        return None, ended

    def _sentence(self, peer: int, why: str) -> str:
        return f"process {peer} of {self.count} was lost ({why}); process {self.me} stops too. {RERUN}"

    def finish(self, value: str) -> bool:
        """Stops the thread and publishes `value` (DONE or FAILED...) as this process's last word;
        False when the watch already ends the process with its own."""
        with self.lock:
            if self.leaving.is_set():
                return False
            self.finished.set()
            self._set(value)
            return True

    def wait_for_peers(self, until_lost: bool) -> str | None:
        """Reads the peers every interval until all have ended (None) or, with `until_lost`, one
        is lost (its sentence); without it, gives up after `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        while until_lost or time.monotonic() < deadline:
            lost, ended = self._verdict(report_errors=False)
            if lost is not None:
                return lost
            if ended:
                return None
            time.sleep(self.interval)
        return None
