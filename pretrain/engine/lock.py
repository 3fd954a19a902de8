"""One live run per OUTPUT_DIR: the lock file ``OUTPUT_DIR/run.lock`` that process 0 of a run
takes before anything is written there, keeps fresh while the run lives and removes at its end.

The lock is a JSON document (host, pid, the process's start time, when the run started, its
command line, the SLURM job if any) created atomically (written to a private file, then
hard-linked to ``run.lock``, which fails if the lock exists; ``O_CREAT | O_EXCL`` where the file
system has no hard links). A daemon thread of the holder touches it every
:data:`HEARTBEAT_S` seconds: its modification time is the heartbeat.

A second run into the same OUTPUT_DIR stops before any work with one sentence naming the holder
(:class:`~pretrain.io.UserError`, exit status 2), unless the holder is gone, in which case the
lock is taken over with a warning:

* same host: its pid is dead, a zombie, or now another process (the start time in
  ``/proc/<pid>/stat`` differs), or the machine rebooted since (``boot_id``) -- so the
  ``--resume`` after a SIGKILL continues at once;
* another host (shared file system): no heartbeat for :data:`STALE_AFTER_S` seconds (10 min; the
  clocks of the machines may differ by a little, not by minutes);
* the same SLURM job restarted (``SLURM_RESTART_COUNT`` higher): a requeued job's earlier run,
  which SLURM has ended, on whichever host.

A takeover is atomic too: the taker first creates ``run.lock.takeover`` (as the lock itself),
then checks that the lock is still the stale one it examined and replaces it. Every process of a
multi-process run agrees: process 0 decides and the others learn its answer
(:func:`lock_output_dir` is collective).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

from detectron2.utils import comm

from pretrain.io import UserError

__all__ = [
    "LOCK_NAME",
    "HEARTBEAT_S",
    "STALE_AFTER_S",
    "RunLock",
    "lock_output_dir",
    "check_output_dir_free",
    "release_output_dir_locks",
    "process_start_time",
]

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# the holder touches the lock this often; a lock of another host untouched for STALE_AFTER_S is
# stale (its run was killed with the machine, or the machine lost the file system)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
# a takeover guard older than this was left by a taker killed mid-takeover
_GUARD_STALE_S = 60.0


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_start_time(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks after boot, ``/proc/<pid>/stat`` field
    22), or None where there is no ``/proc`` or no such process."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)", which may hold spaces
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    stat = _read_text(f"/proc/{pid}/stat")
    return stat is not None and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _boot_id() -> Optional[str]:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return not _is_zombie(pid)


def _slurm_job() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID") or None


def _slurm_restart() -> int:
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def _describe(info: Dict[str, Any]) -> str:
    """``process P on HOST, since WHEN`` of a lock's document."""
    return (
        f"process {info.get('pid', '?')} on {info.get('host', '?')}, since "
        f"{info.get('started', '?')}"
    )


def _format_age(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _stale_reason(info: Optional[Dict[str, Any]], mtime: float) -> Optional[str]:
    """Why the holder of a lock (its document ``info``, its file's ``mtime``) is gone, or None
    while it may still run."""
    age = time.time() - mtime
    if info is None:  # never written by this module (link and replace are atomic)
        if age > STALE_AFTER_S:
            return f"the lock is not readable and untouched for {_format_age(age)}"
        return None
    job = _slurm_job()
    if job is not None and info.get("slurm_job") == job:
        if _slurm_restart() > int(info.get("slurm_restart") or 0):
            return f"it was an earlier run of SLURM job {job}, which was requeued"
    if info.get("host") == socket.gethostname():
        pid = int(info.get("pid", -1))
        boot = _boot_id()
        if boot is not None and info.get("boot_id") not in (None, boot):
            return "the machine rebooted since"
        if pid == os.getpid() and info.get("proc_start") == process_start_time(pid):
            return "it is this process (an earlier run in it did not release the lock)"
        if pid <= 0 or not _pid_alive(pid):
            return f"process {pid} is gone"
        start = process_start_time(pid)
        if start is not None and info.get("proc_start") not in (None, start):
            return f"process {pid} is gone (its pid now belongs to another process)"
        return None
    if age > STALE_AFTER_S:
        return (
            f"its heartbeat is {_format_age(age)} old (more than {STALE_AFTER_S / 60:.0f} min: "
            "that run is gone)"
        )
    return None


def _link_new(path: str, text: str) -> bool:
    """Create ``path`` with ``text`` atomically unless it exists (then False): a private file
    hard-linked to ``path``, or ``O_CREAT | O_EXCL`` where hard links are not supported."""
    directory = os.path.dirname(path)
    private = os.path.join(
        directory, f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}."
        f"{uuid.uuid4().hex[:8]}"
    )
    with open(private, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(private)
    # no hard links here: exclusive creation (a reader may see the file empty for a moment)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def _replace(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_lock(path: str) -> "tuple[Optional[Dict[str, Any]], Optional[float]]":
    """``(document or None if unreadable, mtime)``; ``(None, None)`` when there is no lock."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None, None
    text = _read_text(path)
    if text is None:
        return None, None  # removed in between
    try:
        info = json.loads(text)
    except ValueError:
        return None, mtime
    return (info if isinstance(info, dict) else None), mtime


class RunLock:
    """The lock of one OUTPUT_DIR held by this process (see the module's docstring)."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.takeover: Optional[str] = None  # the warning of a takeover, for the run's log
        self.lost = False

    def document(self) -> Dict[str, Any]:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "proc_start": process_start_time(pid),
            "boot_id": _boot_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "started_unix": time.time(),
            "argv": list(sys.argv),
            "slurm_job": _slurm_job(),
            "slurm_restart": _slurm_restart(),
            "heartbeat_s": HEARTBEAT_S,
            "token": self.token,
        }

    def _ours(self) -> bool:
        info, _ = _read_lock(self.path)
        return info is not None and info.get("token") == self.token

    def acquire(self) -> None:
        """Take the lock, or raise the one-sentence :class:`UserError` naming its holder."""
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create OUTPUT_DIR {self.output_dir} ({e.strerror or e}); check the path."
            ) from e
        text = json.dumps(self.document(), indent=1) + "\n"
        for _ in range(5):  # a lock removed or taken over between our looks: look again
            try:
                if _link_new(self.path, text):
                    return
                info, mtime = _read_lock(self.path)
                if mtime is None:
                    continue  # released in between
                reason = _stale_reason(info, mtime)
                if reason is None:
                    raise UserError(self._held_message(info))
                if self._take_over(info, text):
                    holder = _describe(info) if info else "an unknown process"
                    self.takeover = (
                        f"took over the lock {self.path} of {holder}: {reason}."
                    )
                    return
            except OSError as e:
                raise UserError(
                    f"cannot create the lock file {self.path} ({e.strerror or e}); check that "
                    "OUTPUT_DIR is writable."
                ) from e
        info, _ = _read_lock(self.path)
        raise UserError(self._held_message(info))

    def _held_message(self, info: Optional[Dict[str, Any]]) -> str:
        holder = _describe(info) if info else "a process whose lock file cannot be read"
        return (
            f"OUTPUT_DIR {self.output_dir} is in use by another run ({holder}; lock file "
            f"{self.path}): wait for that run to end, or choose another OUTPUT_DIR."
        )

    def _take_over(self, stale: Optional[Dict[str, Any]], text: str) -> bool:
        """Replace the stale lock ``stale`` by ours, one taker at a time; False if another
        process changed the lock meanwhile (then look again)."""
        guard = self.path + ".takeover"
        if not _link_new(guard, self.token):
            with contextlib.suppress(OSError):
                if time.time() - os.stat(guard).st_mtime > _GUARD_STALE_S:
                    os.unlink(guard)  # its taker was killed mid-takeover
            time.sleep(0.2)
            return False
        try:
            info, mtime = _read_lock(self.path)
            same = (info or {}).get("token") == (stale or {}).get("token")
            if mtime is None or not same:
                return False
            _replace(self.path, text)
            return self._ours()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(guard)

    def heartbeat(self) -> bool:
        """Touch the lock (the heartbeat); False, with a warning, once it is no longer ours."""
        if self.lost:
            return False
        if not self._ours():
            self.lost = True
            info, _ = _read_lock(self.path)
            holder = _describe(info) if info else "nobody"
            logger.warning(
                "The lock %s of this run is now held by %s (this run looked stale to it): two "
                "runs may be writing into %s.",
                self.path,
                holder,
                self.output_dir,
            )
            return False
        with contextlib.suppress(OSError):
            os.utime(self.path, None)
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.lost and self._ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)


# the locks this process holds, by real path of OUTPUT_DIR, and the thread that keeps them fresh
_held: Dict[str, RunLock] = {}
_mutex = threading.Lock()
_heartbeat: Optional[threading.Event] = None  # set to stop the current heartbeat thread


def _forget_parent_locks() -> None:
    """In a forked child (a data-loader worker, a test's worker): the parent's locks are not
    this process's to refresh or release."""
    global _mutex, _heartbeat
    _mutex = threading.Lock()
    _held.clear()
    _heartbeat = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_locks)


def _beat(stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with _mutex:
            locks = list(_held.values())
        for lock in locks:
            with contextlib.suppress(Exception):  # never let the heartbeat kill the run
                lock.heartbeat()


def _acquire_local(output_dir: str) -> RunLock:
    global _heartbeat
    key = os.path.realpath(output_dir)
    with _mutex:
        if key in _held:  # this process holds it already (a second stage of the same run)
            return _held[key]
    lock = RunLock(output_dir)
    lock.acquire()
    with _mutex:
        _held[key] = lock
        if _heartbeat is None:
            _heartbeat = threading.Event()
            threading.Thread(
                target=_beat, args=(_heartbeat,), name="run-lock-heartbeat", daemon=True
            ).start()
    return lock


def lock_output_dir(output_dir: str) -> Optional[RunLock]:
    """Take the lock of ``output_dir`` (collective): process 0 decides, every process raises the
    same one-sentence :class:`UserError` when another run holds it. Returns the lock on process
    0 (its ``takeover`` is the warning to log, if it took a stale lock over), None on the
    others. Released by :func:`release_output_dir_locks` (at the end of the launched job, and
    at exit)."""
    lock: Optional[RunLock] = None
    error: Optional[str] = None
    if comm.is_main_process():
        try:
            lock = _acquire_local(output_dir)
        except UserError as e:
            error = str(e)
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error is not None:
        raise UserError(error)
    return lock


def check_output_dir_free(output_dir: str) -> None:
    """Raise the one-sentence :class:`UserError` of :func:`lock_output_dir` when another live
    run holds the lock of ``output_dir``, without taking it (collective): for runs started
    in-process (``run_linear_eval``, a notebook), which have no end at which to release a
    lock; a run launched by a tool holds the lock itself and passes."""
    error: Optional[str] = None
    if comm.is_main_process():
        with _mutex:
            ours = os.path.realpath(output_dir) in _held
        path = os.path.join(output_dir, LOCK_NAME)
        info, mtime = (None, None) if ours else _read_lock(path)
        if mtime is not None and _stale_reason(info, mtime) is None:
            error = RunLock(output_dir)._held_message(info)
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error is not None:
        raise UserError(error)


def release_output_dir_locks() -> List[str]:
    """Release every lock this process holds; returns their paths."""
    global _heartbeat
    with _mutex:
        locks = list(_held.values())
        _held.clear()
        if _heartbeat is not None:
            _heartbeat.set()
            _heartbeat = None
    for lock in locks:
        lock.release()
    return [lock.path for lock in locks]


atexit.register(release_output_dir_locks)
