"""Checkpoints that resume a run exactly: weights, optimiser, scheduler, RNG streams, data position.

Each checkpoint is written to a temporary directory and renamed into place, so a crash (even SIGKILL)
mid-write never leaves a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (embedding == lm_head) appear once per name here; clone so safetensors accepts them.
    return {
        n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep the newest `keep` ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **trainer_state,
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))[
        :-keep
    ]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG; returns the trainer state (step, data position...)."""
    params = dict(model.named_parameters())
    for name, tensor in load_file(path / "trainable.safetensors").items():
        if name not in params:
            raise RuntimeError(
                f"checkpoint {path} has parameter {name!r} that this model lacks: "
                "was it made with a different student or LoRA setting?"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(state.pop("rng"))
    return state
