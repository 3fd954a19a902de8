"""Checkpointing: fvcore's ``Checkpointer`` with atomic writes, ``weights_only`` loads and a resume
decided by process 0, and the checkpointable RNG states of every process (exact resume)."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from fvcore.common.checkpoint import Checkpointer

from pretrain.io import (
    UserError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temp_files,
)

__all__ = ["AtomicCheckpointer", "RNGStates"]

logger = logging.getLogger(__name__)


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

    def save(self, name: str, **kwargs: Any) -> None:
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        if self.meta_fn is not None:
            data["meta"] = self.meta_fn()
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

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

    def last_checkpoint_of_main_process(self) -> Optional[str]:
        """The checkpoint that ``last_checkpoint`` names in the main process's ``save_dir``, or
        None; collective (call it on every process).

        The main process first removes the temp files of interrupted saves, then decides; its
        answer (the file name) is broadcast and joined with this process's ``save_dir``, which is
        the same folder (:func:`pretrain.engine.check_shared_output_dir`). No process looks for a
        checkpoint on its own: on a disk of its own it would find another one, or none.
        """
        name = None
        if comm.is_main_process():
            self.remove_stale_temp_files()
            if self.has_checkpoint():
                name = os.path.basename(self.get_checkpoint_file())
        if comm.get_world_size() > 1:
            name = comm.all_gather(name)[0]
        return None if name is None else os.path.join(self.save_dir, name)

    def resume_last(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Resume from :meth:`last_checkpoint_of_main_process` on every process (collective):
        restore the model and every checkpointable; return ``(path, extra)`` (``extra`` holds
        ``iteration``, the same on every process), or None when there is no checkpoint."""
        path = self.last_checkpoint_of_main_process()
        if path is None:
            return None
        extra = self.load(path)
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
