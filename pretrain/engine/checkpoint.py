"""Checkpointing: fvcore's ``Checkpointer`` with atomic writes, ``weights_only`` loads and a resume
decided by process 0 (past damaged checkpoints, to the newest one that loads), and the
checkpointable RNG states of every process (exact resume)."""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from fvcore.common.checkpoint import Checkpointer

from pretrain.io import (
    TEMP_PREFIX,
    UserError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
)

__all__ = ["AtomicCheckpointer", "RNGStates"]

logger = logging.getLogger(__name__)

# PeriodicCheckpointer's names: PREFIX_0001999.pth after an iteration, PREFIX_final.pth at the end
_CHECKPOINT_NAME = re.compile(r"^(?P<prefix>.+)_(?P<iter>\d+|final)\.pth$")
DAMAGED_SUFFIX = ".damaged"


class AtomicCheckpointer(Checkpointer):
    """fvcore ``Checkpointer`` with atomic writes, ``weights_only`` loads and a ``meta`` entry.

    ``save`` must be called on every process (as detectron2's ``PeriodicCheckpointer`` hook does):
    collecting the state may be collective (:class:`RNGStates`); only the main process writes.
    ``meta_fn()`` returns the ``meta`` dict of docs/formats.md, stored with every checkpoint.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        meta_fn: Optional[Callable[[], Dict[str, Any]]] = None,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.meta_fn = meta_fn

    def save_is_collective(self) -> bool:
        """Whether every process calls :meth:`save` (then they agree on its outcome): true when
        collecting the state already is collective (an :class:`RNGStates` among the
        checkpointables, pretraining and linear eval), false where only the main process saves
        (detectron2's detection hooks)."""
        return comm.get_world_size() > 1 and any(
            isinstance(obj, RNGStates) for obj in self.checkpointables.values()
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``name.pth`` atomically, then ``last_checkpoint`` (main process).

        A full disk or an unwritable folder is a :class:`UserError` naming the file, the free
        space and the checkpoint's size (``pretrain.io.atomic_save``); the earlier checkpoints
        and ``last_checkpoint`` stay as they were. When every process saves
        (:meth:`save_is_collective`), the main process's outcome is gathered and every process
        raises the same error, rather than the others waiting in the next collective forever."""
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        if self.meta_fn is not None:
            data["meta"] = self.meta_fn()
        if not self.save_dir:
            return
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        failure: Optional[BaseException] = None
        if self.save_to_disk:
            self.logger.info("Saving checkpoint to %s", path)
            try:
                atomic_save(data, path)
                self.tag_last_checkpoint(basename)
            except Exception as e:
                failure = e
        del data
        if self.save_is_collective():
            outcome = None
            if failure is not None:
                outcome = (isinstance(failure, UserError), str(failure), type(failure).__name__)
            failed = [o for o in comm.all_gather(outcome) if o is not None]
            if failure is None and failed:
                is_user, message, kind = failed[0]
                if is_user:
                    raise UserError(message)
                raise UserError(
                    f"{path}: the process that writes checkpoints failed to save it ({kind}: "
                    f"{message}); see its traceback."
                )
        if failure is not None:
            raise failure

    def remove_stale_temp_files(self) -> None:
        """Delete the temp files of saves that were killed mid-write (main process only)."""
        if self.save_dir and self.save_to_disk:
            stale = remove_stale_temp_files(self.save_dir)
            if stale:
                self.logger.info(
                    "Removed %d partial file(s) of interrupted saves: %s",
                    len(stale),
                    ", ".join(stale),
                )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume:
            self.remove_stale_temp_files()
        return super().resume_or_load(path, resume=resume)

    # ------------------------------------------------------------------ choosing the checkpoint
    def _named_in_last_checkpoint(self) -> Optional[str]:
        """The file name ``last_checkpoint`` holds (None without that file; "" if it is empty);
        read leniently, since it may be damaged as well."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag, encoding="utf-8", errors="replace") as f:
                return os.path.basename(f.read().strip())
        except FileNotFoundError:
            return None

    def _checkpoint_names(self) -> List[str]:
        """The checkpoint files of ``save_dir`` (PREFIX_0000123.pth, PREFIX_final.pth)."""
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return []
        return sorted(
            n
            for n in names
            if _CHECKPOINT_NAME.match(n)
            and not n.startswith(TEMP_PREFIX)
            and os.path.isfile(os.path.join(self.save_dir, n))
        )

    def _iteration_of(self, name: str) -> Optional[int]:
        """The iteration a checkpoint holds: the number in its name, or for ``*_final.pth`` its
        ``iteration`` entry (read memory-mapped, without the tensors' data); None if unreadable."""
        m = _CHECKPOINT_NAME.match(name)
        if m is None:
            return None
        if m["iter"] != "final":
            return int(m["iter"])
        try:
            extra = torch.load(
                os.path.join(self.save_dir, name), map_location="cpu", weights_only=True, mmap=True
            )
            return int(extra["iteration"])
        except Exception:  # damaged: loading it (later) says why
            return None

    def _older_than(self, named: Optional[str]) -> List[str]:
        """The checkpoints to try after ``named``, newest first: those that hold an earlier
        iteration (all of them if ``named`` is missing or its iteration is unknown). A
        ``*_final.pth`` is placed by the iteration inside it, before a numbered checkpoint of
        the same iteration; one whose iteration cannot be read comes first (it will not load)."""
        limit = None
        if named is not None:
            m = _CHECKPOINT_NAME.match(named)
            if m is not None and m["iter"] != "final":
                limit = int(m["iter"])
        keyed = []
        for name in self._checkpoint_names():
            if name == named:
                continue
            it = self._iteration_of(name)
            key = float("inf") if it is None else float(it)
            if limit is None or key < limit:
                keyed.append((key, name.endswith("_final.pth"), name))
        return [name for _, _, name in sorted(keyed, reverse=True)]

    def _try_load(self, path: str) -> Tuple[Optional[Dict[str, Any]], str]:
        """``(data, "")`` when ``path`` loads, else ``(None, why)``. Read as this checkpointer
        reads its torch files: ``pretrain.io.load_checkpoint``, or detectron2's ``_torch_load``
        where a subclass has one (the detection checkpointer's, which honours ``--unsafe``)."""
        reader = getattr(self, "_torch_load", load_checkpoint)
        try:
            return reader(path), ""
        except (UserError, OSError) as e:
            why = str(e) if path in str(e) else f"{path}: {e}"
            cause = e.__cause__
            if cause is not None and str(cause).strip():
                # torch's own reason, its first sentence ("PytorchStreamReader failed reading zip
                # archive: failed finding central directory")
                first = str(cause).strip().splitlines()[0].split(". ")[0].rstrip(".")
                why = f"{why.rstrip('.')} ({type(cause).__name__}: {first})."
            return None, why

    def _rename_damaged(self, name: str) -> str:
        """Rename a checkpoint that does not load to ``name.damaged`` (``.damaged.1``, ... if
        taken): kept for the user, out of the way of the next resume. Returns the new name."""
        new = name + DAMAGED_SUFFIX
        n = 0
        while os.path.exists(os.path.join(self.save_dir, new)):
            n += 1
            new = f"{name}{DAMAGED_SUFFIX}.{n}"
        os.replace(os.path.join(self.save_dir, name), os.path.join(self.save_dir, new))
        return new

    def _choose_checkpoint(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """Main process: the newest checkpoint that loads, walking back from the one that
        ``last_checkpoint`` names, and its loaded data; ``(None, None)`` without
        ``last_checkpoint``.

        Each checkpoint that does not load is reported (a warning naming it and why) and, once
        one that loads is found, renamed to ``*.damaged`` (never deleted); ``last_checkpoint``
        is then rewritten to name the chosen one. Raises a :class:`UserError` when none loads
        (nothing is renamed then)."""
        named = self._named_in_last_checkpoint()
        if named is None:
            return None, None
        tag = os.path.join(self.save_dir, "last_checkpoint")
        exists = bool(named) and os.path.isfile(os.path.join(self.save_dir, named))
        if not exists:
            self.logger.warning(
                "%s names %r, which does not exist; resuming from the newest checkpoint in %s "
                "that loads.",
                tag,
                named,
                self.save_dir,
            )

        def candidates() -> Iterator[str]:
            if exists:
                yield named
            yield from self._older_than(named or None)  # listed only if the named one fails

        damaged: List[str] = []
        for name in candidates():
            path = os.path.join(self.save_dir, name)
            data, why = self._try_load(path)
            if data is None:
                self.logger.warning("Skipping a damaged checkpoint: %s", why)
                damaged.append(name)
                continue
            for bad in damaged:
                new = self._rename_damaged(bad)
                self.logger.warning(
                    "Renamed the damaged checkpoint %s to %s (kept, not deleted).", bad, new
                )
            if name != named:
                self.tag_last_checkpoint(name)
                self.logger.warning(
                    "Resuming from %s, the newest checkpoint that loads; %s now names it.",
                    path,
                    tag,
                )
            return name, data
        if not damaged:
            raise UserError(
                f"{tag} names {named!r}, which does not exist, and {self.save_dir} holds no other "
                "checkpoint; put the file back, or delete last_checkpoint to start from scratch."
            )
        raise UserError(
            f"{self.save_dir}: none of its checkpoints loads ({', '.join(damaged)}: see the "
            "warnings above); restore one from a backup, or delete last_checkpoint to start "
            "from scratch."
        )

    def _decide(self, keep_data: bool) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """The main process chooses (:meth:`_choose_checkpoint`) and every process gets the
        file name, or the same :class:`UserError`; collective. ``data``: the main process's
        loaded checkpoint when ``keep_data``, else None."""
        name, data, error = None, None, None
        if comm.is_main_process():
            self.remove_stale_temp_files()
            try:
                name, data = self._choose_checkpoint()
            except UserError as e:
                error = str(e)
        if comm.get_world_size() > 1:
            name, error = comm.all_gather((name, error))[0]
        if error is not None:
            raise UserError(error)
        return name, data if keep_data else None

    def last_checkpoint_of_main_process(self) -> Optional[str]:
        """The checkpoint to resume from in the main process's ``save_dir``, or None without a
        ``last_checkpoint``; collective (call it on every process).

        The main process removes the temp files of interrupted saves, then decides: the file
        ``last_checkpoint`` names if it loads, else the newest older one that loads (see
        :meth:`_choose_checkpoint`: damaged ones are renamed ``*.damaged``, ``last_checkpoint``
        rewritten; none loads: a :class:`UserError` on every process). Its answer (the file name)
        is broadcast and joined with this process's ``save_dir``, which is the same folder
        (:func:`pretrain.engine.check_shared_output_dir`). No process looks for a checkpoint on
        its own: on a disk of its own it would find another one, or none.
        """
        name, _ = self._decide(keep_data=False)
        return None if name is None else os.path.join(self.save_dir, name)

    def resume_last(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Resume from :meth:`last_checkpoint_of_main_process` on every process (collective):
        restore the model and every checkpointable; return ``(path, extra)`` (``extra`` holds
        ``iteration``, the same on every process), or None when there is no checkpoint. The main
        process reuses the data it loaded to check the file instead of reading it twice."""
        name, data = self._decide(keep_data=True)
        if name is None:
            return None
        path = os.path.join(self.save_dir, name)
        if data is not None and type(self)._load_file is AtomicCheckpointer._load_file:
            # fvcore's load reads the file through self._load_file, here load_checkpoint as in
            # the check: hand it the data read then (a subclass with its own reader reads again)
            def preloaded(f: str) -> Any:
                if os.path.abspath(f) == os.path.abspath(path):
                    return data
                return load_checkpoint(f)

            self._load_file = preloaded  # type: ignore[method-assign]
        try:
            extra = self.load(path)
        finally:
            self.__dict__.pop("_load_file", None)
            data = None
        iteration = int(extra["iteration"])
        if comm.get_world_size() > 1:
            seen = comm.all_gather(iteration)
            if len(set(seen)) > 1:
                raise UserError(
                    f"{path}: the processes read different iterations from it ({seen}); is the "
                    "checkpoint being rewritten by another job?"
                )
        return path, extra

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        # written after the checkpoint it names and replaced atomically, so it never points to a
        # partial file nor is itself half-written
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, f: str) -> Dict[str, Any]:
        # fvcore's documented extension point for the file format: refuse pickled code
        return load_checkpoint(f)


class RNGStates:
    """Checkpointable RNG states of every process: torch (CPU and CUDA), numpy, python, plus named
    ``torch.Generator``s (e.g. the negatives sampler). ``state_dict`` is collective."""

    def __init__(self, generators: Optional[Dict[str, torch.Generator]] = None) -> None:
        self.generators = dict(generators or {})

    def _local(self) -> Dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            # numpy's and python's states as tensors/lists: loadable with weights_only=True
            "numpy": {
                "key": np_state[0],
                "pos": int(np_state[2]),
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "generators": {k: g.get_state() for k, g in self.generators.items()},
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {"per_rank": comm.all_gather(self._local())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        per_rank = state["per_rank"]
        rank = comm.get_rank()
        if len(per_rank) != comm.get_world_size():
            logger.warning(
                "Checkpoint holds RNG states of %d processes, this run has %d: the random streams "
                "continue but not bit-exactly.",
                len(per_rank),
                comm.get_world_size(),
            )
        s = per_rank[rank % len(per_rank)]
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state(
            (
                n["key"],
                n["keys"].numpy().astype(np.uint32),
                n["pos"],
                n["has_gauss"],
                n["cached_gaussian"],
            )
        )
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
        for k, g in self.generators.items():
            if k not in s["generators"]:
                continue
            state = s["generators"][k]
            if state.numel() != g.get_state().numel():
                # e.g. a CUDA (Philox) generator's state from a checkpoint of an older version
                logger.warning(
                    "The checkpoint's %r generator state (%d bytes) is not that of this run's CPU "
                    "generator (%d bytes): it continues from its seed, so its draws (negatives, "
                    "shuffles) are not those of an uninterrupted run.",
                    k,
                    state.numel(),
                    g.get_state().numel(),
                )
                continue
            g.set_state(state)
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])
