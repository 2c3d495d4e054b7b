"""The run lease: one process writes a run directory, `runs/<run_id>/`, at a time.

train-flow takes the lease of its run before the first stage and holds it until
the run manifest is written; a second process that finds it held fails before it
writes anything, naming the holder. Workers of multi-worker training write
nothing and take no lease: the chief, which runs the flow, holds it.

- A local root: an flock on `runs/<run_id>/.lease`. The kernel releases it when
  the holder's process ends, however it ends, so a retry takes it over at once.
  The file holds the holder's host, pid and start, for the message. The holder
  deletes it on release, still locked; a process that locked the deleted file in
  between finds the path no longer names it, and tries again.
- An object store: the object `runs/<run_id>/.lease`, created only if absent and
  renewed by a heartbeat every third of its lifetime, each time by a
  compare-and-swap on the version last written (tapeline/storage/versioned.py). A lease not
  renewed for its lifetime ($TAPELINE_LEASE_SECONDS, default 120) has expired:
  its holder is taken for dead, and the next process takes it over by a
  compare-and-swap against the expired version, so a retried flow run resumes
  without waiting on a person. A holder whose renewal fails has lost the lease
  and stops at the next stage (`check`). Expiry compares the holder's clock with
  the taker's: machines sharing a bucket must keep their clocks in step.

Released, the lease is gone, and so is the run directory if the run wrote no file
of its own into it: a run refused after it started (a bad label, a refused source)
leaves nothing. A run that wrote something, checkpoints above all, keeps it all:
a rerun resumes from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from tapeline.errors import TapelineError
from tapeline.storage.root import Storage, utc_now
from tapeline.storage.versioned import VersionedObject

LEASE_SECONDS_ENV = "TAPELINE_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 120.0


class RunLeaseHeld(TapelineError):
    """Another process holds the run's lease."""


class RunLease:
    """`with RunLease(storage, run_id):` around everything that writes the run."""

    def __init__(self, storage: Storage, run_id: str, seconds: float | None = None, say_who: bool = True):
        """`say_who=False`: on a local root, lock without writing who holds the lease, so that taking it needs no
        free space (gc, which frees it); a process refused meanwhile is told "another process"."""
        self.run_id, self.path, self._storage, self._say_who = run_id, storage.layout.run(run_id).lease, storage, say_who
        self.seconds = seconds or float(os.environ.get(LEASE_SECONDS_ENV, DEFAULT_LEASE_SECONDS))
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": utc_now()}
        self._object = VersionedObject(storage, self.path) if storage.remote else None
        self._file, self._version, self._lost = None, None, None
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, name=f"lease {run_id}", daemon=True)

    def __enter__(self) -> RunLease:
        if self._object is None:
            with self._storage.writing(self.path):  # a rerun on a disk still full: its one line
                self._lock_file()
        else:
            self._take_object()
            self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._delete_file()
            self._file.close()  # releases the flock
        else:
            self._stop.set()
            self._heartbeat.join()
            if self._lost is None:
                self._object.delete()  # an object store has no directories: nothing else to remove

    def check(self) -> None:
        """Raise if the heartbeat lost the lease to another process: this one must stop writing."""
        if self._lost is not None:
            raise RunLeaseHeld(f"run {self.run_id!r}: lost its lease to {_describe(self._lost)}; this process stopped writing")

    def _lock_file(self) -> None:
        while (handle := self._locked_file()) is None:
            pass  # the file was deleted or replaced before we locked it: its holder released the lease
        if self._say_who:
            handle.truncate(0)
            handle.write(json.dumps(self._holder) + "\n")
            handle.flush()
        self._file = handle

    def _locked_file(self):
        """The lease file, open and locked; None if the path no longer names the file locked (try again)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except (FileNotFoundError, FileExistsError):  # the releasing holder removed the empty run directory meanwhile
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            raise self._held(holder) from None
        if _names(self.path, handle):
            return handle
        handle.close()
        return None

    def _delete_file(self) -> None:
        """Delete the lease file, still locked (see the module's docstring), and the run directory if it holds no
        other file: its empty directories while no other process can write there, the directory itself last."""
        directory = self.path.parent
        empty = not any(path != self.path and not path.is_dir() for path in directory.rglob("*"))  # stops at a file
        if empty:
            for path in sorted(directory.rglob("*"), key=lambda path: len(path.parts), reverse=True):  # the deepest first
                if path != self.path:
                    path.rmdir()
        self.path.unlink(missing_ok=True)
        if empty:
            with contextlib.suppress(OSError):  # not empty: another process has just opened a new lease file there
                directory.rmdir()

    def _take_object(self) -> None:
        holder, version = self._object.read()
        if holder is not None and holder["expires"] > time.time():
            raise self._held(holder)
        self._version = self._object.swap(self._renewed(), version)
        if self._version is None:  # another process took it between our read and our write
            raise self._held(self._object.read()[0])
        if holder is not None:
            print(f"run {self.run_id}: took over the expired lease of {_describe(holder)}")

    def renew(self) -> bool:
        """Extend an object-store lease by its lifetime, by a compare-and-swap on the version last written; False if
        another process has taken it meanwhile (`check` then raises). The heartbeat calls it every third of the
        lifetime; a test calls it directly, to renew at a moment of its choosing."""
        version = self._object.swap(self._renewed(), self._version)
        if version is None:
            self._lost = self._object.read()[0] or {}
            print(f"run {self.run_id}: lease lost to {_describe(self._lost)}; stopping at the next stage")
            return False
        self._version = version
        return True

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.renew():
                    return
            except Exception as error:  # a passing fault: try again at the next beat, while the lease lasts
                print(f"run {self.run_id}: could not renew the lease ({' '.join(str(error).split())}); retrying")

    def _renewed(self) -> dict:
        return {**self._holder, "expires": time.time() + self.seconds}

    def _held(self, holder: dict | None) -> RunLeaseHeld:
        return RunLeaseHeld(
            f"run {self.run_id!r} is being written by {_describe(holder)}: "
            "wait for it to finish (or, if it died, for its lease to expire), or choose another --run-name"
        )


def _names(path: Path, handle) -> bool:
    """Whether `path` still names the open file `handle`."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def live_holder(storage: Storage, run_id: str) -> dict | None:
    """Who holds the run's lease now (host, pid, since; {} if it does not say), or None; asked without taking it,
    and writing nothing.

    Locally: a shared flock tried and released at once (it fails while a writer holds the lease).
    On an object store: the lease object, if it has not expired."""
    path = storage.layout.run(run_id).lease
    if storage.remote:
        holder, _ = VersionedObject(storage, path).read()
        return holder if holder is not None and holder["expires"] > time.time() else None
    try:
        handle = path.open("r")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(handle.read())
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _parse(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:  # caught between the holder's truncate and write
        return {}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    expires = f", lease expires {time.strftime('%H:%M:%SZ', time.gmtime(holder['expires']))}" if "expires" in holder else ""
    return f"{holder['host']} pid {holder['pid']} since {holder['since']}{expires}"
