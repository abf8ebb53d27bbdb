"""A served model's weights replaced while it serves: staged off the forward thread, swapped on it.

An update is two steps (the engine runs them, engine.update_weights):

1. `stage` (any thread; forwards go on meanwhile): check every tensor of the safetensors files against the
   model — known name, same shape, same dtype (the sender casts: a bfloat16 teacher takes BF16) — read them
   into host memory, refuse non-finite values and tied names (lm_head.weight = embed_tokens.weight) given
   two different values, and rebuild the served head when the update changes it. Any problem raises an
   InvalidRequest naming the tensor, and nothing of the model has been touched.
2. `apply` (on the forward thread, so between two batches): copy the staged tensors into the model's own
   storage and count the version up. Shapes and dtypes are checked, so the copies cannot fail halfway.

The version numbers the weights a forward ran with: 0 as loaded, +1 per applied update. Peak memory during
an update is the model plus the staged tensors (in host memory).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from opd_client.errors import InvalidRequest
from opd_teacher.backends.head import HeadExport, head_from_tensors
from opd_teacher.weights_file import TensorEntry, read_header

# torch dtype -> safetensors code; a model tensor of another dtype cannot be updated.
ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class StagedWeights:
    """New values, checked and in host memory, waiting for the forward thread."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # (the model's tensor, its new value), one per storage
    names: list[str]  # the tensor names the update gave
    nbytes: int  # bytes of tensor data read
    head: HeadExport | None  # the served head rebuilt from the new values; None: the head is unchanged
    source: str  # "push" or the reloaded path
    load_s: float  # reading and checking


class LiveWeights:
    """The tensors of one model by their state_dict names (tied names alias one tensor), and its version."""

    def __init__(self, model: torch.nn.Module, head: HeadExport | None) -> None:
        self.model = model
        self.head = head
        self.targets: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        # The largest update that makes sense: every name once (tied tensors under each of their names).
        self.nbytes = sum(t.numel() * t.element_size() for t in self.targets.values())
        self.version = 0
        output = model.get_output_embeddings()  # type: ignore[operator]
        self._head_weight = getattr(output, "weight", None)
        self._head_bias = getattr(output, "bias", None)

    def stage(self, files: list[Path], source: str, field: str, all_tensors: bool = False) -> StagedWeights:
        """Check and read the tensors of `files` (a push's body, or a reloaded directory's shards); with
        `all_tensors` they must replace every tensor of the model (a sender that means to replace the whole
        model, e.g. a trainer whose student must be the teacher's architecture, learns of a mismatch)."""
        started = time.perf_counter()
        entries: list[tuple[Path, TensorEntry]] = []
        seen: dict[str, Path] = {}
        for path in files:
            for entry in read_header(path, field):
                if entry.name in seen:
                    raise InvalidRequest(
                        f"{field}: tensor {entry.name!r} is in both {seen[entry.name].name} and {path.name}",
                        field=field,
                    )
                seen[entry.name] = path
                self._check(entry, field)
                entries.append((path, entry))
        if all_tensors:
            self._check_complete(seen, field)
        new_by_target: dict[int, tuple[str, torch.Tensor]] = {}
        nbytes = 0
        for _, entry, value in _read(entries):
            nbytes += entry.nbytes
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise InvalidRequest(
                    f"{field}: tensor {entry.name!r} holds {bad} NaN or infinite values; the teacher would "
                    "answer NaN",
                    field=field,
                )
            target = self.targets[entry.name]
            earlier = new_by_target.get(id(target))
            if earlier is not None and not torch.equal(earlier[1], value):
                raise InvalidRequest(
                    f"{field}: {earlier[0]!r} and {entry.name!r} are one tensor in this model (tied) but "
                    "the update gives them different values; send one of them",
                    field=field,
                )
            new_by_target[id(target)] = (entry.name, value)
        targets = {id(t): t for t in self.targets.values()}
        pairs = [(targets[key], value) for key, (_, value) in new_by_target.items()]
        return StagedWeights(
            pairs=pairs,
            names=[e.name for _, e in entries],
            nbytes=nbytes,
            head=self._new_head(new_by_target),
            source=source,
            load_s=time.perf_counter() - started,
        )

    def _check(self, entry: TensorEntry, field: str) -> None:
        target = self.targets.get(entry.name)
        if target is None:
            example = next(iter(self.targets))
            raise InvalidRequest(
                f"{field}: this model has no tensor {entry.name!r} (its {len(self.targets)} tensors are "
                f"named as in its state_dict, e.g. {example!r})",
                field=field,
            )
        if tuple(target.shape) != entry.shape:
            raise InvalidRequest(
                f"{field}: tensor {entry.name!r} has shape {list(entry.shape)}; the model's is "
                f"{list(target.shape)}",
                field=field,
            )
        want = ST_DTYPES.get(target.dtype)
        if entry.dtype != want:
            raise InvalidRequest(
                f"{field}: tensor {entry.name!r} is {entry.dtype}; the model holds it as "
                f"{str(target.dtype).removeprefix('torch.')} ({want}): cast it before sending",
                field=field,
            )

    def _check_complete(self, names: dict[str, Path], field: str) -> None:
        covered = {id(self.targets[name]) for name in names}
        missing = [name for name, t in self.targets.items() if id(t) not in covered]
        if missing:
            raise InvalidRequest(
                f"{field}: all_tensors was asked for, but {len(missing)} of the model's {len(self.targets)} "
                f"tensors are not in the update, e.g. {missing[0]!r}: the sender's model is not this one",
                field=field,
            )

    def _new_head(self, new_by_target: dict[int, tuple[str, torch.Tensor]]) -> HeadExport | None:
        """The head's served bytes with the update's values, when it changes the head (tied embeddings)."""
        if self.head is None or self._head_weight is None:
            return None
        keys = [id(self._head_weight)] + ([id(self._head_bias)] if self._head_bias is not None else [])
        if not any(key in new_by_target for key in keys):
            return None
        weight = new_by_target.get(id(self._head_weight), ("", self._head_weight))[1]
        bias = self._head_bias
        if bias is not None and id(bias) in new_by_target:
            bias = new_by_target[id(bias)][1]
        return head_from_tensors(weight, bias, self.head.logit_scale, self.head.final_logit_softcapping)

    @torch.no_grad()
    def apply(self, staged: StagedWeights) -> int:
        """Copy the staged values in (on the forward thread: between batches); the new version."""
        for target, value in staged.pairs:
            target.data.copy_(value)
        if staged.head is not None:
            self.head = staged.head
        self.version += 1
        return self.version


def _read(entries: list[tuple[Path, TensorEntry]]) -> Iterator[tuple[Path, TensorEntry, torch.Tensor]]:
    """Each entry's tensor (a copy in host memory), every file opened once."""
    by_file: dict[Path, list[TensorEntry]] = {}
    for path, entry in entries:
        by_file.setdefault(path, []).append(entry)
    for path, file_entries in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for entry in file_entries:
                yield path, entry, f.get_tensor(entry.name)
