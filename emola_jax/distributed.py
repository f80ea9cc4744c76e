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
    if auto:
        jax.distributed.initialize()
    else:
        # explicit: no cluster detection, which under SLURM would give each process one device
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                   cluster_detection_method="deactivate")
    if jax.process_count() > 1:
        _watch = PeerWatch(peer_timeout)


def finish() -> None:
    """Tells the other processes that this one ended its work (it is not lost)."""
    if _watch is not None:
        _watch.finish(DONE)


def leave_after_error(error: BaseException, wait: float = 10.0) -> None:
    """Ends this process of a multi-process run that stopped with `error` (already printed): the
    others read it and stop at once, naming it, instead of waiting for a collective that never
    completes. Process 0 holds the coordination service, so it first waits (at most `wait`
    seconds) for the others to end. Exits without jax's shutdown, which waits for every process."""
    if _watch is None:
        return
    message = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    _watch.finish(FAILED + message)
    if _watch.me == 0:
        _watch.wait_for_peers_to_end(wait)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def lost_peer() -> str | None:
    """The sentence naming a process that stopped responding, if one did (this process then
    stops too); None while every process is alive or ended on its own."""
    return None if _watch is None else _watch.check_now(report_errors=False)


class PeerWatch:
    """A daemon thread that writes this process's beat count to the coordination service's
    key-value store every `interval` seconds and reads the others'. A peer whose count stays the
    same for `timeout` seconds, or a coordinator that no longer answers, is lost: the sentence
    naming it goes to stderr and this process exits with status 1 (without jax's shutdown, which
    would wait for the lost process)."""

    def __init__(self, timeout: float, interval: float = 1.0):
        from jax._src import distributed  # the client jax.distributed.initialize made

        self.client = distributed.global_state.client
        self.timeout, self.interval = timeout, interval
        self.me, self.count = jax.process_index(), jax.process_count()
        self.peers = [p for p in range(self.count) if p != self.me]
        start = time.monotonic()
        self.last = {p: (None, start) for p in self.peers}  # last value seen, and when it changed
        self.beats = 0
        self.finished = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="emola_jax-peer-watch", daemon=True).start()

    def _run(self) -> None:
        while not self.finished.wait(self.interval):
            sentence = self.check_now()
            if sentence is not None and not self.finished.is_set():
                print(f"\nerror: {sentence}", file=sys.stderr, flush=True)  # on a line of its own, after any bar
                os._exit(1)

    def check_now(self, report_errors: bool = True) -> str | None:
        """Beats once and reads every peer; the sentence naming a lost process (or, with
        `report_errors`, one that stopped with an error), or None."""
        with self.lock:
            self.beats += 1
            try:
                self.client.key_value_set(f"{_KEY}{self.me}", str(self.beats), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - any failure here means the service is gone
                return self._sentence(0, "the coordinator no longer answers")
            now = time.monotonic()
            for peer in self.peers:
                try:
                    value = self.client.key_value_try_get(f"{_KEY}{peer}")
                except Exception as err:  # noqa: BLE001
                    if "NOT_FOUND" not in str(err):
                        return self._sentence(0, "the coordinator no longer answers")
                    value = None  # not started beating yet
                seen, since = self.last[peer]
                if value == DONE:
                    continue
                if value is not None and value.startswith(FAILED):
                    if not report_errors:
                        continue
                    return (f"process {peer} of {self.count} stopped with an error ({value[len(FAILED):]}); "
                            f"process {self.me} stops too")
                if value != seen:
                    self.last[peer] = (value, now)
                elif now - since > self.timeout:
                    return self._sentence(peer, f"no sign of life for {now - since:.0f} s")
            return None

    def _sentence(self, peer: int, why: str) -> str:
        return f"process {peer} of {self.count} was lost ({why}); process {self.me} stops too. {RERUN}"

    def finish(self, value: str) -> None:
        with self.lock:
            self.finished.set()
            try:
                self.client.key_value_set(f"{_KEY}{self.me}", value, allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the others then see this process as lost, as it is gone
                pass

    def wait_for_peers_to_end(self, seconds: float) -> None:
        """Until every peer has written DONE or FAILED, or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                values = [self.client.key_value_try_get(f"{_KEY}{p}") for p in self.peers]
            except Exception:  # noqa: BLE001 - a peer that never beat, or a service gone: nothing to wait for
                return
            if all(v == DONE or v.startswith(FAILED) for v in values):
                return
            time.sleep(0.2)
