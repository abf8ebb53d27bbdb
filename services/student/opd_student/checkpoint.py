"""Checkpoints that resume a run exactly: weights, optimiser, scheduler, RNG streams, data position.

Each checkpoint is written to a temporary directory and renamed into place, so a crash (even SIGKILL)
mid-write never leaves a checkpoint that looks complete but is not. The format is
torch.distributed.checkpoint's, so a run saved by N trainer processes resumes on M.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from opd_student.distributed import SINGLE, World

_PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    root = checkpoint_dir(run_dir)
    done = (
        sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        if root.exists()
        else []
    )
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # LoRA: the adapters; else every weight
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights come from the base


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    world: World = SINGLE,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep the newest `keep` ones. Every rank calls this.

    Weights and optimiser state go through torch.distributed.checkpoint: each rank writes its shards, keyed
    by parameter name, so any number of ranks (or one process) can load them. Rank 0 adds the trainer state
    (step, data position, scheduler, RNG) and renames the directory into place once all ranks are done.
    Several machines must share the run directory's filesystem.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    with warnings.catch_warnings():  # one process is a normal case here, not a misconfiguration
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if world.is_main:
        torch.save(
            {
                "step": step,
                "world_size": world.size,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **trainer_state,
            },
            tmp / "trainer_state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG on every rank, whatever the number of ranks that
    wrote the checkpoint; returns the trainer state (step, data position...)."""
    if not (path / ".metadata").exists():
        raise SystemExit(
            f"error: {path} is not a checkpoint this version can resume (no torch.distributed.checkpoint "
            "metadata); it was written by an older opd"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}  # dcp.load fills it in place
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP wraps per-rank failures; the first line names the missing key
        raise SystemExit(
            f"error: cannot load checkpoint {path} into this model (was it made with a different student or "
            f"LoRA setting?): {str(e).strip().splitlines()[0][:300]}"
        ) from e
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_LOAD_OPTIONS,
    )
    trainer = torch.load(path / "trainer_state.pt", weights_only=False)
    scheduler.load_state_dict(trainer.pop("scheduler"))
    set_rng_state(trainer.pop("rng"))
    return trainer


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable weights of a checkpoint, read in one process (opd analyze-update)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", weights_only=False)
    return state["model"]
