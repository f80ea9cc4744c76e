"""Joining a multi-process run, and leaving it cleanly when a peer is lost.

One home for training, evaluation and generation alike. A process that dies (`kill -9`, a lost
host) leaves the others blocked in a collective that never completes: jax's own heartbeat check
ends them only after its timeout, with an abort. `PeerWatch` instead names the lost process in
one sentence and ends this one within `peer_timeout` seconds; the rerun resumes from what was
finished. The one case it cannot phrase is a lost process 0: the coordination service lives in
it, and jax's client ends the others at once with its own fatal log (no callback can be given).

Starting is guarded the same way, so that a wrong command line is one sentence on every process
(exit status 1) instead of a C++ stack dump on one and a hang on the others:

- a roll call (`_roll_call`) before jax's coordination service starts: process 0 opens the
  coordinator's port with a plain socket and waits (up to `peer_timeout` seconds) for every other
  process to say its --process-id and --num-processes. A port already in use, two processes with
  the same id, different process counts, a process that never comes and a coordinator that never
  answers are each named there, before any process registers with jax: a duplicate id that
  reaches jax's service ends every process of the run with a fatal log, and a port in use makes
  process 0's jax crash (a fatal log or a segmentation fault, jaxlib 0.10);
- a deadline on `jax.distributed.initialize` itself, `peer_timeout` seconds, ahead of jax's own
  (which ends the process with a fatal log and a stack dump);
- `refuse_different_settings`: right after, every process publishes its settings (its command
  line, less --process-id) in the coordination service and reads the others'; processes started
  with different ones all stop, each difference named, before any work.

What cannot be phrased at start-up, and why:

- with --distributed (jax's cluster detection) there is no roll call: the address and ids come
  from the cluster and are known only inside `jax.distributed.initialize`. A fault there ends
  after `peer_timeout` seconds with a general sentence, or at once with jax's own fatal log when
  the service reports it (a duplicate id, say);
- a process that comes after the roll call is complete (a duplicate of a process that already
  joined) finds jax's service on the port, not process 0's roll call: it stops alone, saying that
  no process 0 of its run answered, and the run goes on without it;
- jaxlib's client turns every error of the service into a fatal log through its default
  callback; a Python callback cannot replace it (jaxlib cannot hand the absl::Status to Python:
  std::bad_cast, then std::terminate), so these faults are caught before they reach jax.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import jax
from jax._src import distributed as jax_distributed  # private: the client jax.distributed.initialize made

_KEY = "emola_jax/heartbeat/"
_GONE = "emola_jax/gone/"  # written by a process that printed its last words, just before it exits
_SETTINGS = "emola_jax/settings/"  # each process's settings, as JSON
_HELLO = "emola_jax start-up"  # the tag of every roll-call message
JAX_SLACK = 60  # seconds jax's own start-up deadline lies behind ours, so that ours speaks first
DONE, FAILED = "done", "failed: "
RERUN = ("Rerun the same command on every process: training resumes from the last complete checkpoint, "
         "evaluation after the last written prediction")
_watch: PeerWatch | None = None


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
    auto: bool = False, peer_timeout: float = 60.0, settings: dict[str, Any] | None = None,
) -> None:
    """Joins a multi-process run before any device is touched: explicitly (coordinator address,
    process count and id, e.g. several hosts or several processes on one machine), or `auto`
    (TPU pods, SLURM and other clusters jax detects). CPU processes talk through gloo. A process
    that stops beating for `peer_timeout` seconds ends the others (`PeerWatch`).

    Explicitly, a roll call comes first (see the module's docstring); a start-up fault raises
    `JoinError` with its sentence, before jax starts. Every process waits for the others at most
    `peer_timeout` seconds at each step of the start. With `settings` (this process's command line,
    JSON-able, less its --process-id), processes started with different ones stop together
    (`refuse_different_settings`)."""
    global _watch
    if coordinator is None and not auto:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if peer_timeout <= 0:
        raise ValueError(f"the peer timeout must be positive, not {peer_timeout}")
    if not auto and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if not auto and process_id >= num_processes:
        raise ValueError(f"--process-id {process_id} is not below --num-processes {num_processes}: the ids of "
                         f"{num_processes} processes run from 0 to {num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat = max(100, int(2 * peer_timeout))  # jax's own check must not end a process before PeerWatch does
    jax_timeout = math.ceil(peer_timeout) + JAX_SLACK
    if auto:
        with _start_deadline(peer_timeout, None):
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat, initialization_timeout=jax_timeout)
    else:
        _roll_call(coordinator, num_processes, process_id, peer_timeout)
        with _start_deadline(peer_timeout, coordinator):
            # explicit: no cluster detection, which under SLURM would give each process one device
            jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                                       cluster_detection_method="deactivate", heartbeat_timeout_seconds=heartbeat,
                                       initialization_timeout=jax_timeout)
    if jax.process_count() > 1:
        if settings is not None:
            refuse_different_settings(settings, peer_timeout)
        _watch = PeerWatch(peer_timeout)


class JoinError(RuntimeError):
    """A fault at the start of a multi-process run, found before jax's coordination service
    started: its message is the one sentence to print (naming this process, the coordinator and
    what to change)."""


def different_settings(settings: dict[int, dict[str, Any]]) -> str | None:
    """The sentence naming every setting on which the processes differ, with each process's value
    (processes with the same value together), or None when all agree.

    `settings` maps each process's index to its settings, named as the user gives them (`--steps`);
    a setting a process lacks counts as not given. E.g. `the processes were started with different
    settings: --steps is 30 on process 0 and 40 on process 1; start every process with the same
    command (only --process-id differs)`."""
    names: dict[str, None] = {}
    for values in settings.values():
        names.update(dict.fromkeys(values))
    parts = []
    for name in names:
        by_value: dict[str, list[int]] = {}
        for process in sorted(settings):
            by_value.setdefault(_shown(settings[process].get(name)), []).append(process)
        if len(by_value) > 1:
            parts.append(f"{name} is " + _and([f"{value} on process{'es' if len(ps) > 1 else ''} {_and(ps)}"
                                               for value, ps in by_value.items()]))
    if not parts:
        return None
    return (f"the processes were started with different settings: {'; '.join(parts)}; start every process with "
            "the same command (only --process-id differs)")


def refuse_different_settings(settings: dict[str, Any], timeout: float) -> None:
    """Publishes this process's `settings` in jax's coordination service, reads every process's
    (waiting at most `timeout` seconds for them) and returns when all are the same. Otherwise every
    process prints the one sentence of `different_settings` and exits with status 1, before any
    work; process 0, which holds the service, last. Call it right after jax.distributed.initialize,
    on every process of a run of several."""
    client = jax_distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    client.key_value_set(f"{_SETTINGS}{me}", json.dumps(settings))
    every: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    for process in range(count):
        try:
            left_ms = max(1, int(1000 * (deadline - time.monotonic())))
            every[process] = json.loads(client.blocking_key_value_get(f"{_SETTINGS}{process}", left_ms))
        except Exception:  # noqa: BLE001 - a deadline, or the service is gone
            print(f"error: process {process} of {count} did not publish its settings within {timeout:g} s; "
                  f"process {me} stops too. Rerun the same command on every process", file=sys.stderr, flush=True)
            _leave(client, me, set(range(1, count)) - {process}, timeout)
    sentence = different_settings(every)
    if sentence is not None:
        print(f"error: {sentence}", file=sys.stderr, flush=True)
        _leave(client, me, set(range(1, count)), timeout)


def _leave(client, me: int, waiting_for: set[int], timeout: float) -> NoReturn:
    """Exits with status 1 once this process's words are out. Process 0 holds the coordination
    service, whose end would abort the others mid-sentence: it leaves after the processes
    `waiting_for` (or after `timeout` seconds)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if me == 0:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if waiting_for <= set(_read(client, _GONE)):
                    break
            except Exception:  # noqa: BLE001 - nothing more to wait for
                break
            time.sleep(0.1)
    else:
        try:
            client.key_value_set(f"{_GONE}{me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service is gone: nobody waits
            pass
    os._exit(1)


def _read(client, prefix: str) -> dict[int, str]:
    """Every process's value under `prefix` (one read); raises when the service is gone."""
    return {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(prefix)}


def _shown(value: Any) -> str:
    """A setting's value as the sentence shows it."""
    if value is None or value is False:
        return "not given"
    if value is True:
        return "given"
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) and ";" not in value else json.dumps(value)
    return json.dumps(value)


def _and(items: list) -> str:
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@contextlib.contextmanager
def _start_deadline(timeout: float, coordinator: str | None) -> Iterator[None]:
    """Ends this process with one sentence when the block (jax.distributed.initialize) has not
    returned within `timeout` seconds: jax's own deadline ends it later with a fatal log."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(timeout):
            return

        state = jax_distributed.global_state
        address = coordinator or state.coordinator_address or "detected by jax"
        print(f"error: process {state.process_id} of {state.num_processes} cannot start (coordinator {address}): "
              f"jax's coordination service did not connect every process within {timeout:g} s; check that every "
              "process started and reaches the coordinator's address, then rerun every process",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="emola_jax-start-deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _roll_call(coordinator: str, count: int, me: int, timeout: float) -> None:
    """Meets every process of the run on the coordinator's port before jax does (see the module's
    docstring): process 0 hosts it, the others join. Returns once all `count` are there; raises
    `JoinError` on every process that takes part when one is missing, doubled or differs."""
    if count == 1:
        return
    host, port = _address(coordinator)

    def fault(what: str, fix: str) -> JoinError:
        return JoinError(f"process {me} of {count} cannot start (coordinator {coordinator}): {what}; {fix}")

    hello = {"hello": _HELLO, "id": me, "n": count}
    if me != 0:
        _join_roll_call(host, port, hello, timeout, fault)
        return
    try:
        listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
            if socket.has_dualstack_ipv6() else socket.create_server(("", port))
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise fault(f"port {port} cannot be opened ({err.strerror})",
                        "give every process another port in --coordinator") from None
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=min(timeout, 3)) as probe:
            reply = _talk(probe, bytearray(), hello, min(timeout, 3))  # another process 0 of this run hosts it?
            if reply is not None and "error" in reply:
                raise fault(reply["error"], reply["fix"]) from None
        raise fault(f"port {port} is in use by another program",
                    "give every process the same free port in --coordinator") from None
    with listener:
        _host_roll_call(listener, count, timeout, fault)


def _address(coordinator: str) -> tuple[str, int]:
    host, colon, port = coordinator.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT, not {coordinator!r}")
    return host.strip("[]"), int(port)


def _host_roll_call(listener: socket.socket, count: int, timeout: float, fault) -> None:
    """Process 0's side: answers each hello at once ("wait"), then all of them together: "ok" once
    processes 1..count-1 are there, or the fault (also raised here)."""
    deadline = time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytearray] = {}
    joined: dict[int, socket.socket] = {}
    heard: list[socket.socket] = []  # every connection that said hello: each hears the verdict
    problem = None
    try:
        while problem is None and len(joined) < count - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [p for p in range(1, count) if p not in joined]
                problem = (f"process{'es' if len(missing) > 1 else ''} {_and(missing)} did not join within "
                           f"{timeout:g} s", "start every process with the same --coordinator and --num-processes, "
                           f"each with its own --process-id from 0 to {count - 1}")
                break
            for key, _ in selector.select(left):
                if key.fileobj is listener:
                    conn = listener.accept()[0]
                    buffers[conn] = bytearray()
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:  # a process that left (or a stray connection): it may come again
                    selector.unregister(conn)
                    conn.close()
                    joined = {p: c for p, c in joined.items() if c is not conn}
                    heard = [c for c in heard if c is not conn]
                    continue
                buffers[conn] += data
                if b"\n" not in buffers[conn] or conn in heard:
                    continue
                message = _message(buffers[conn].partition(b"\n")[0])
                if message is None or not isinstance(message.get("id"), int) or not isinstance(message.get("n"), int):
                    selector.unregister(conn)  # not one of ours
                    conn.close()
                    continue
                heard.append(conn)
                process, n = message["id"], message["n"]
                if n != count:
                    problem = (f"process {process} was started with --num-processes {n} and process 0 with {count}",
                               "give every process the same --num-processes")
                elif process == 0 or process in joined:
                    problem = (f"two processes were started with --process-id {process}",
                               f"give each process its own --process-id from 0 to {count - 1}")
                else:
                    joined[process] = conn
                    _send(conn, {"wait": True})
                if problem is not None:
                    break
        verdict = {"ok": True} if problem is None else {"error": problem[0], "fix": problem[1]}
        for conn in heard:
            _send(conn, verdict)
        end = time.monotonic() + 2
        for conn in heard:  # each closes first: the port stays free of connections waiting to close
            conn.settimeout(max(0.01, end - time.monotonic()))
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
    finally:
        for conn in buffers:
            conn.close()
        selector.close()
    if problem is not None:
        raise fault(*problem)


def _join_roll_call(host: str, port: int, hello: dict, timeout: float, fault) -> None:
    """The side of a process other than 0: says hello to the coordinator until process 0 answers
    (at most `timeout` seconds), then waits for its verdict."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 2))
        except OSError:
            time.sleep(min(0.25, max(left, 0)))
            continue
        with conn:
            buffer = bytearray()
            reply = _talk(conn, buffer, hello, min(left, 3))
            if reply is None:  # not process 0 of this run (or process 0 just ended): try again
                time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
                continue
            if "wait" in reply:  # process 0 decides within its timeout, which began before this connection
                reply = _receive(conn, buffer, timeout + 5)
            if reply is None:
                raise fault("process 0 ended before every process joined",
                            "read process 0's error, then rerun every process")
            if "error" in reply:
                raise fault(reply["error"], reply["fix"])
            return
    raise fault(f"no process 0 of this run answered there within {timeout:g} s",
                "start process 0, which hosts the coordinator, and give every process the same --coordinator "
                "with a free port")


def _talk(conn: socket.socket, buffer: bytearray, message: dict, timeout: float) -> dict | None:
    """Sends `message`, returns the answer (None: none of ours within `timeout` seconds)."""
    if not _send(conn, message):
        return None
    return _receive(conn, buffer, timeout)


def _send(conn: socket.socket, message: dict) -> bool:
    try:
        conn.settimeout(2)
        conn.sendall(json.dumps({"hello": _HELLO, **message}).encode() + b"\n")
        return True
    except OSError:
        return False


def _receive(conn: socket.socket, buffer: bytearray, timeout: float) -> dict | None:
    """The next roll-call message on `conn` (None: none within `timeout` seconds, the connection
    closed, or what came is not one)."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or len(buffer) > 65536:
            return None
        try:
            conn.settimeout(left)
            data = conn.recv(4096)
        except OSError:
            return None
        if not data:
            return None
        buffer += data
    line, _, rest = buffer.partition(b"\n")
    buffer[:] = rest
    return _message(line)


def _message(line: bytes) -> dict | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("hello") == _HELLO else None


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
        self.client = jax_distributed.global_state.client
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
        _leave(self.client, self.me, set(self.last) - self.lost, self.timeout)

    def _set(self, value: str, prefix: str = _KEY) -> bool:
        try:
            self.client.key_value_set(f"{prefix}{self.me}", value, allow_overwrite=True)
            return True
        except Exception:  # noqa: BLE001 - any failure here means the service is gone
            return False

    def _read(self, prefix: str) -> dict[int, str]:
        """Every process's value under `prefix` (one read); raises when the service is gone."""
        return _read(self.client, prefix)

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
