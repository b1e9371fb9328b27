"""The trainers' checkpointer: atomic writes, a resume point that is never garbage, exact RNG.

File handling (atomic writes, safe reads, backbone export/import) lives in
:mod:`bissl_det.checkpoint`; this module holds only what is about a training run:

* :class:`AtomicCheckpointer`: Detectron2's checkpointer with atomic files and tag; diagnostic
  checkpoints that are never tagged; ``--resume`` that skips unreadable, non-finite and
  diagnostic files (falling back to the newest good one, and saying so) and warns which
  optimiser settings of the config the checkpoint overrides.
* :class:`TrainingProgress`: warm-up done, batches drawn per level, every rank's RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..checkpoint import CheckpointFileError, atomic_save, atomic_write_text, load_checkpoint_file
from ..runtime.run_identity import check_resume_checkpoint, read_run_file

logger = logging.getLogger(__name__)

# Diagnostic checkpoints (engine/faults.py): a non-finite value; an exception on one process.
DIAGNOSTIC_PREFIXES = ("model_nonfinite_", "model_fault_")
_NUMBERED = re.compile(r"model_(\d+)\.pth")


class UnusableCheckpointError(CheckpointFileError):
    """A training checkpoint that loads but must not be resumed from (non-finite, diagnostic)."""


def _resume_order(name: str) -> tuple[int, int]:
    """Newest first: model_final, then model_<iter> by iteration, then model_warmup."""
    if name == "model_final.pth":
        return (0, 0)
    numbered = _NUMBERED.fullmatch(name)
    if numbered:
        return (1, -int(numbered.group(1)))
    return (2, 0)


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files and ``last_checkpoint`` tag are written atomically.

    In multi-process runs :meth:`save` is collective (every process calls it at the same
    step: it gathers each rank's RNG state; rank 0 writes). :meth:`save_diagnostic` is not.
    """

    def save(self, name: str, **kwargs) -> None:
        progress = self.checkpointables.get("progress")
        if isinstance(progress, TrainingProgress) and comm.get_world_size() > 1:
            progress.rank_rng = comm.gather(rng_state(), dst=0) or None
        try:
            with contextlib.ExitStack() as gathered:
                # State held in shards across ranks (the Fisher history) is gathered onto rank 0.
                for obj in self.checkpointables.values():
                    if hasattr(obj, "gathered_for_checkpoint"):
                        gathered.enter_context(obj.gathered_for_checkpoint())
                self._write(name, tag=True, **kwargs)
        finally:
            if isinstance(progress, TrainingProgress):
                progress.rank_rng = None

    def save_diagnostic(self, name: str, this_process: bool = False, **kwargs) -> None:
        """Write the state for post-mortem only: never tagged, never a resume point.

        ``this_process``: written by the calling process whatever its rank (a fault that only
        it saw); otherwise by rank 0 only.
        """
        self._write(name, tag=False, any_rank=this_process, **kwargs)

    def _write(self, name: str, tag: bool, any_rank: bool = False, **kwargs) -> None:
        if not self.save_dir or not (self.save_to_disk or any_rank):
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        run = read_run_file(self.save_dir)
        if run is not None:  # which run wrote it: --resume refuses another run's checkpoint
            data["run_identity"] = run
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_save(data, save_file)
        if tag:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, Path(self.save_dir) / "last_checkpoint")

    # ---- Resume ------------------------------------------------------------------------------

    def resume_candidates(self) -> list[str]:
        """The tagged checkpoint, then every other training checkpoint, newest first."""
        tagged = self.get_checkpoint_file()
        others = sorted(
            (
                name
                for name in os.listdir(self.save_dir)
                if name.startswith("model_")
                and name.endswith(".pth")
                and not name.startswith(DIAGNOSTIC_PREFIXES)
                and os.path.join(self.save_dir, name) != tagged
            ),
            key=_resume_order,
        )
        return [tagged] + [os.path.join(self.save_dir, name) for name in others]

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """Resume from the newest usable checkpoint; never from a broken or non-finite one.

        Raises:
            CheckpointFileError: ``resume`` and checkpoints exist, but none is usable (lists
                each file and why): a run never silently restarts from scratch.
        """
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        rejected = []
        for candidate in self.resume_candidates():
            if not os.path.isfile(candidate):
                rejected.append(f"{candidate} (tagged in last_checkpoint) does not exist")
                continue
            try:
                self._resuming = True  # _load_file checks the file belongs to this run
                checkpoint = self.load(candidate)
            except CheckpointFileError as err:
                rejected.append(str(err))
                continue
            finally:
                self._resuming = False
            if rejected:
                logger.warning(
                    "--resume: not resuming from %s; resuming from %s, the newest usable "
                    "checkpoint, instead",
                    "; ".join(rejected),
                    candidate,
                )
            return checkpoint
        raise CheckpointFileError(
            f"--resume: no usable checkpoint in {self.save_dir}: {'; '.join(rejected)}. Remove "
            "the broken files (or start without --resume in a new OUTPUT_DIR)"
        )

    def _load_file(self, filename: str) -> dict:
        """Read and check a checkpoint before anything of the run is changed.

        Every format goes through the one safe reader (Detectron2's own reads ``.pkl`` with a
        full ``pickle.load``, which can run code); ``.pkl`` and ``.pyth`` are then shaped as
        Detectron2 shapes them.
        """
        checkpoint = load_checkpoint_file(filename)
        if not isinstance(checkpoint, dict):
            raise CheckpointFileError(f"{filename} is not a checkpoint (a {type(checkpoint)})")
        if filename.endswith(".pkl"):
            checkpoint = model_zoo_layout(checkpoint)
        elif filename.endswith(".pyth"):  # pycls
            checkpoint = pycls_layout(filename, checkpoint)
        if "model" not in checkpoint:  # a bare state dict, as Detectron2 reads it
            checkpoint = {"model": checkpoint}
        if "diagnostic" in checkpoint or Path(filename).name.startswith(DIAGNOSTIC_PREFIXES):
            raise UnusableCheckpointError(
                f"{filename} is a diagnostic checkpoint of a failed step, not a resume point"
            )
        nonfinite = [
            key
            for key, value in checkpoint["model"].items()
            if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all()
        ]
        if nonfinite:
            raise UnusableCheckpointError(
                f"{filename} holds {len(nonfinite)} non-finite tensors, e.g. {nonfinite[:5]}"
            )
        if getattr(self, "_resuming", False):
            run = read_run_file(self.save_dir)
            check_resume_checkpoint(filename, checkpoint, run, self.model.state_dict())
        self._warn_overridden_settings(filename, checkpoint)
        return checkpoint

    def _warn_overridden_settings(self, filename: str, checkpoint: dict) -> None:
        """Say which optimiser settings of the config the checkpoint's state replaces."""
        changed = []
        for key, obj in self.checkpointables.items():
            if not isinstance(obj, torch.optim.Optimizer) or key not in checkpoint:
                continue
            saved_groups = checkpoint[key].get("param_groups", [])
            for index, (now, saved) in enumerate(zip(obj.param_groups, saved_groups, strict=False)):
                # With a scheduler "lr" follows the schedule; "initial_lr" is the configured lr.
                skip = ("params", "lr") if "initial_lr" in now else ("params",)
                for setting, value in now.items():
                    if setting not in skip and setting in saved and saved[setting] != value:
                        changed.append(
                            f"{key} group {index} {setting}: config {value}, checkpoint "
                            f"{saved[setting]}"
                        )
        if changed:
            logger.warning(
                "--resume from %s: the checkpoint's optimiser settings override the config's "
                "(%s). To train with the new values, start a new run from the exported backbone",
                filename,
                "; ".join(changed),
            )


def model_zoo_layout(data: dict) -> dict:
    """A Detectron2 / Caffe2 model-zoo pickle's content in the layout Detectron2 loads it in."""
    if "model" in data and "__author__" in data:  # Detectron2 model zoo
        return data
    blobs = data.get("blobs", data)  # Caffe2 detection models keep their tensors under "blobs"
    weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def pycls_layout(filename: str, data: dict) -> dict:
    """A pycls ``.pyth`` checkpoint's content in the layout Detectron2 loads it in."""
    if "model_state" not in data:
        raise CheckpointFileError(f"{filename}: a pycls .pyth checkpoint needs 'model_state'")
    weights = {
        k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
    }
    return {"model": weights, "__author__": "pycls", "matching_heuristics": True}


def rng_state() -> dict:
    """This process's torch/NumPy/Python (and CUDA) RNG states, as plain tensors and lists.

    Plain containers only, so checkpoints load with ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state()
    state = {
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python_rng": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


class TrainingProgress:
    """Trainer state beyond weights: warm-up done, batches drawn per level, RNG states.

    Checkpointed with the weights so that ``--resume`` continues with the same data and the same
    random augmentations as an uninterrupted run (exact with NUM_WORKERS = 0). Multi-process:
    ``rank_rng`` holds every rank's state (gathered by :meth:`AtomicCheckpointer.save`), and
    rank r restores its own.
    """

    def __init__(self) -> None:
        self.warmup_done = False
        self.pretext_batches = 0
        self.downstream_batches = 0
        self.rank_rng: list[dict] | None = None

    def state_dict(self) -> dict:
        state = {
            "warmup_done": self.warmup_done,
            "pretext_batches": self.pretext_batches,
            "downstream_batches": self.downstream_batches,
            **rng_state(),
        }
        if self.rank_rng is not None:
            state["rank_rng"] = self.rank_rng
        return state

    def load_state_dict(self, state: dict) -> None:
        self.warmup_done = bool(state["warmup_done"])
        self.pretext_batches = int(state["pretext_batches"])
        self.downstream_batches = int(state["downstream_batches"])
        world, rank = comm.get_world_size(), comm.get_rank()
        per_rank = state.get("rank_rng")
        if per_rank is not None and len(per_rank) == world:
            set_rng_state(per_rank[rank])
            return
        if world > 1:
            saved = f"{len(per_rank)} processes" if per_rank else "one process's state only"
            logger.warning(
                "--resume: the checkpoint holds RNG states of %s, this run has %d processes: "
                "every rank restarts from rank 0's state, so random augmentations are not "
                "those of an uninterrupted run",
                saved,
                world,
            )
        set_rng_state(state)
