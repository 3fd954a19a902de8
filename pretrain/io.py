"""File I/O of the whole project: atomic writes, safe checkpoint/weights loading, the readers of
run outputs (results.json, metrics.json), and the one-sentence error that every CLI prints
instead of a traceback."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import sys
import tempfile
from typing import IO, Any, Callable, Iterator

import torch

__all__ = [
    "UserError",
    "atomic_open",
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


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success fsync it and rename it over
    ``path``, on an exception delete it. Every file the project writes goes through here.

    A crash (even SIGKILL) at any moment leaves either the old file or the complete new one (and
    at most a ``.tmp_*`` file that :func:`remove_stale_temp_files` deletes)::

        with atomic_open("results.json") as f:
            json.dump(results, f)
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes files; got mode {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would have
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file (``last_checkpoint``, ``results.json``) through :func:`atomic_open`."""
    with atomic_open(path) as f:
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
    killed mid-write) and non-numeric values are skipped. A missing file gives ``{}``.
    """
    series: dict[str, dict[int, float]] = {}
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
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
    """Decorator for CLI entry points: print a :class:`UserError` as ``error: ...`` and exit 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
