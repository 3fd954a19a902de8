"""File I/O of the whole project: atomic writes (a full disk or a read-only folder is one sentence
naming the file, never a partial file), safe checkpoint/weights loading, the readers of run
outputs (results.json, metrics.json), and the one-sentence error that every CLI prints instead of
a traceback."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import pickle
import shutil
import sys
import tempfile
from typing import IO, Any, Callable, Iterator

import torch

__all__ = [
    "UserError",
    "atomic_open",
    "format_bytes",
    "serialized_size",
    "write_error",
    "atomic_save",
    "atomic_write_text",
    "save_figure",
    "read_json",
    "read_metrics",
    "remove_stale_temp_files",
    "load_checkpoint",
    "load_weights_pickle",
    "exit_on_user_error",
]

# prefix of the temporary files of atomic_open (see remove_stale_temp_files)
TEMP_PREFIX = ".tmp_"
_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A problem with the user's input (path, config key, checkpoint kind).

    The message is one sentence naming the file or key and what to do; CLIs print it without a
    traceback and exit with status 2 (see :func:`exit_on_user_error`).
    """


# errnos of a write that failed for want of room (a full disk, a quota, a file-size limit) or of a
# folder that cannot be written: the user's to fix, one sentence (write_error)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, as ``df -h`` and ``ls -lh`` count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError (with an errno) behind a failed write: ``exc`` itself, or the one that torch's
    zip writer turns into ``RuntimeError: [enforce fail at inline_container.cc] . unexpected
    pos ...`` (it is that error's ``__context__``)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def write_error(
    path: str,
    exc: BaseException,
    written: int = 0,
    needed: int | Callable[[], int | None] | None = None,
) -> UserError | None:
    """The :class:`UserError` for a write of ``path`` that failed with ``exc`` for want of room
    (ENOSPC, EDQUOT, EFBIG) or because its folder cannot be written (EROFS, EACCES, EPERM); None
    for any other failure, which the caller re-raises as it is.

    ``written``: bytes that had reached the file; ``needed``: the size of the whole file if
    known, or a function computing it (called only for a write that failed for want of room). A
    ``RuntimeError`` of torch's writer that lost the errno counts as a full disk only when the
    free space is below ``needed``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    cause = _os_error_behind(exc)
    code = cause.errno if cause is not None else None
    if code is not None and code not in _NO_ROOM | _NOT_WRITABLE:
        return None
    if code is None and not isinstance(exc, RuntimeError):
        return None
    free = _free_bytes(directory)
    if callable(needed):
        needed = _call_quietly(needed)
    if code is None:
        if free is None or needed is None or free >= needed:
            return None  # torch failed for another reason
        code = errno.ENOSPC
    if code in _NO_ROOM:
        size = max(needed or 0, written)
        space = "unknown space" if free is None else format_bytes(free)
        wants = ""
        if size:
            wants = f", the file needs {'about' if needed else 'more than'} {format_bytes(size)}"
        return UserError(
            f"{path}: could not be written ({os.strerror(code)}): {space} free in {directory}"
            f"{wants}; free some space there (or set OUTPUT_DIR to a disk with room) and run "
            "again, with --resume to continue a training run from its last checkpoint."
        )
    if code in _NOT_WRITABLE:
        return UserError(
            f"{path}: could not be written ({os.strerror(code)}); make {directory} writable (or "
            "set OUTPUT_DIR to a folder you can write) and run again."
        )
    return None


@contextlib.contextmanager
def atomic_open(
    path: str, mode: str = "w", *, size: Callable[[], int | None] | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success fsync it and rename it over
    ``path``, on an exception delete it. Every file the project writes goes through here.

    A crash (even SIGKILL) at any moment leaves either the old file or the complete new one (and
    at most a ``.tmp_*`` file that :func:`remove_stale_temp_files` deletes)::

        with atomic_open("results.json") as f:
            json.dump(results, f)

    A write that fails for want of room or of permission (:func:`write_error`) deletes the
    temporary file and raises a :class:`UserError` naming ``path``, the free space and the size
    needed (``size()``, called only then, if given; else the bytes written so far); ``path``
    itself is never touched then.
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes files; got mode {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=directory)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would have
        os.replace(tmp, path)
    except BaseException as e:
        written = 0
        if tmp is not None and os.path.exists(tmp):
            written = os.path.getsize(tmp)
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            error = write_error(path, e, written, size)
            if error is not None:
                raise error from e
        raise


def _call_quietly(fn: Callable[[], int | None]) -> int | None:
    try:
        return fn()
    except Exception:  # only an estimate for the message: never hide the write's own error
        return None


class _ByteCounter:
    """A file that only counts what is written to it (the size of a ``torch.save``)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def serialized_size(obj: Any) -> int:
    """The size in bytes of ``torch.save(obj)``, serialized into a counter (nothing is kept)."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.size


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_open`; a full disk is a :class:`UserError` with the
    checkpoint's size (:func:`serialized_size`)."""
    with atomic_open(path, "wb", size=lambda: serialized_size(obj)) as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file (``last_checkpoint``, ``results.json``) through :func:`atomic_open`."""
    with atomic_open(path, size=lambda: len(text.encode())) as f:
        f.write(text)


def save_figure(fig: Any, path: str, dpi: int) -> None:
    """Lay a matplotlib figure out, write it as a PNG through :func:`atomic_open` and close it
    (also when drawing or writing fails)."""
    import matplotlib.pyplot as plt  # the figure's own: matplotlib is imported already

    try:
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def read_json(path: str) -> Any:
    """The JSON document in ``path``, or None if the file is missing or not valid JSON (e.g. a
    ``results.json`` of an older, interrupted run)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metrics.json`` (detectron2's ``JSONWriter``: one JSON object per line) ->
    ``{key: [(iteration, value)]}`` sorted by iteration.

    A resumed run repeats iterations: the last value written wins. Lines that are not JSON (a run
    killed mid-write, bytes of a bad sector) and non-numeric values are skipped. A missing file
    gives ``{}``.
    """
    series: dict[str, dict[int, float]] = {}
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), (int, float)):
                continue
            it = int(rec["iteration"])
            for key, value in rec.items():
                if (
                    key != "iteration"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    series.setdefault(key, {})[it] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete the temporary files that a save killed mid-write (SIGKILL, power loss) left in
    ``directory``; returns their names. Call it only where no other process is saving."""
    if not os.path.isdir(directory):
        return []
    stale = sorted(f for f in os.listdir(directory) if f.startswith(TEMP_PREFIX))
    for name in stale:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
    return stale


def load_checkpoint(path: str, unsafe: bool = False) -> Any:
    """Load a checkpoint that may come from a stranger.

    Uses ``torch.load(weights_only=True)``, which can only build tensors and plain containers. A
    file that would need arbitrary code execution to load is refused unless ``unsafe=True`` (the
    CLIs' ``--unsafe`` flag), which the user should only pass for files they trust.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; check the path.")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle); anything else is not a
    # checkpoint, and torch's unpickler fails on it with misleading errors.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise UserError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
            "pass the .pth/.pth.tar written by pretraining, MoCo or torchvision."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        if unsafe:
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({e}).") from e
        raise UserError(
            f"{path}: this file needs code execution to load (or is not a PyTorch checkpoint); "
            "pass --unsafe only if you trust its author."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        # torch's messages for non-checkpoints are long or cryptic ("KeyError: 101"): one sentence
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (is it the right file?)."
        ) from e


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: what a detectron2 or Caffe2 (Detectron)
    weights .pkl holds."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        # bytes (array data) in a protocol 0-2 pickle written by Python 3: str -> bytes, no code
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (
            module == "numpy" and name.endswith("DType")  # numpy>=1.25 pickles dtypes as classes
        ) or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_weights_pickle(path: str, unsafe: bool = False) -> Any:
    """Load a detectron2 or Caffe2-style weights ``.pkl`` (dict of numpy arrays) without running
    code; Python 2 pickles are read with ``encoding="latin1"`` as detectron2 does.

    Anything but containers, numbers, strings and numpy arrays is refused unless ``unsafe=True``.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; check the path.")
    with open(path, "rb") as f:
        try:
            if unsafe:
                return pickle.load(f, encoding="latin1")
            return _WeightsUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise UserError(
                f"{path}: not a plain weights pickle ({e}); "
                "pass --unsafe only if you trust its author."
            ) from e
        except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise UserError(
                f"{path}: not a readable weights pickle ({type(e).__name__}: {e})."
            ) from e


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for CLI entry points: print a :class:`UserError` as ``error: ...`` and exit 2.

    So is a write that failed for want of room or on a read-only disk outside :func:`atomic_open`
    (detectron2's ``metrics.json`` / tensorboard writers append to their files): one sentence
    instead of a traceback; the checkpoints and ``last_checkpoint`` are as the last save left
    them."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno not in _NO_ROOM | {errno.EROFS}:
                raise
            where = f"{e.filename}: " if e.filename else ""
            print(
                f"error: {where}a write failed ({os.strerror(e.errno)}); free some space on the "
                "disk of OUTPUT_DIR (or set OUTPUT_DIR to another disk) and run again, with "
                "--resume to continue a training run from its last checkpoint.",
                file=sys.stderr,
            )
            sys.exit(2)

    return wrapper
