"""`teacher_follows_student = N`: the teacher the run trains against gets the student's weights every N steps.

Self-distillation (the teacher is the student's current weights with privileged context) and
co-distillation (two students that teach each other) need a teacher that learns. After every N-th optimizer
step the student's full weights go to the teacher service as one safetensors push (PUT
/v1/models/{name}/weights, docs/api.md): FSDP2 shards gathered to full tensors on rank 0 (a collective:
every rank calls `after_step`), LoRA adapters merged into their base weights (W + (α/r)·B·A, as peft's
merge, without touching the training model), cast to the dtype the teacher holds, the tied lm_head left out.
Rank 0 pushes; the service swaps the weights in between two of its batches. With `student_push_url` the
weights go to that service instead: in co-distillation (`opd codistill`) the one the peer trains against.

Every step's record also says which teacher weights scored its rollouts (`teacher/weights_version_min` and
`_max`: with pipelined scoring, max_staleness ≥ 1, a step's rollouts were sent before the previous step's
push, so they may be scored by the version before it, or by both when the push fell among its requests).
With N = 0 (the default) nothing here runs and nothing is logged.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from opd_client.errors import OpdError
from opd_client.http_client import HttpTeacherClient
from opd_client.schema import ModelInfo
from opd_student.config import TrainConfig
from opd_student.distributed import is_sharded
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink

_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoFollowing:
    """teacher_follows_student = 0: the loop's call does nothing, so its records stay as they were."""

    def after_step(self, step: int) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class PushTarget:
    """Where the student's weights go: the teacher the run trains against, or (student_push_url) the service
    that serves this student to a peer (co-distillation)."""

    client: HttpTeacherClient
    info: ModelInfo
    url: str
    owned: bool  # a client of our own, closed with the follower


class TeacherFollower:
    def __init__(self, cfg: TrainConfig, student: Student, link: TeacherLink, info: ModelInfo) -> None:
        self.every, self.student, self.link = cfg.teacher_follows_student, student, link
        self.lora_scaling = cfg.lora_alpha / cfg.lora_r if cfg.lora else None
        self.target = push_target(cfg, link, info)
        self.dtype = _DTYPES.get(self.target.info.dtype)
        nbytes = payload_bytes(student, self.dtype or torch.float32)
        check_follow(self.target.info, self.dtype, self.target.url, nbytes)

    def after_step(self, step: int) -> dict[str, Any]:
        """After the optimizer step `step` (1-based): the versions that scored it, and the push when due."""
        world = self.student.world
        seen = self.link.last_versions or [-1]
        out: dict[str, Any] = {
            "teacher/weights_version_min": -world.max(-float(min(seen))),
            "teacher/weights_version_max": world.max(float(max(seen))),
        }
        if step % self.every:
            return out
        started = time.perf_counter()
        weights = student_weights(self.student, self.lora_scaling, self.dtype)  # collective under FSDP2
        if weights is not None:  # rank 0
            out["teacher/pushed_version"] = self._push(weights)
        out["time/push_s"] = time.perf_counter() - started
        return out

    def _push(self, weights: dict[str, torch.Tensor]) -> int:
        target = self.target
        try:
            # all_tensors: a teacher of another architecture is refused, not half overwritten
            update = target.client.push_weights(save(weights), model=target.info.name, all_tensors=True)
        except OpdError as e:
            raise SystemExit(
                f"error: teacher_follows_student: the teacher {target.info.name!r} at {target.url} refused the "
                f"student's weights: {e.message}"
            ) from e
        return update.weights_version

    def close(self) -> None:
        if self.target.owned:
            self.target.client.close()


def make_follower(
    cfg: TrainConfig, student: Student, link: TeacherLink, info: ModelInfo
) -> TeacherFollower | NoFollowing:
    """The loop's `after_step` hook for this run."""
    return TeacherFollower(cfg, student, link, info) if cfg.teacher_follows_student else NoFollowing()


def push_target(cfg: TrainConfig, link: TeacherLink, info: ModelInfo) -> PushTarget:
    if cfg.student_push_url is None:
        return PushTarget(link.client, info, link.url, owned=False)
    url = cfg.student_push_url
    api_key = os.environ.get(cfg.student_push_api_key_env) or os.environ.get(cfg.teacher_api_key_env)
    client = HttpTeacherClient(url, api_key=api_key, timeout=cfg.teacher_timeout_s)
    try:
        infos = {i.name: i for i in client.models()}
    except OpdError as e:
        client.close()
        raise SystemExit(f"error: student_push_url {url}: {e.message}") from e
    name = cfg.student_push_model or next(iter(infos))
    if name not in infos:
        client.close()
        raise SystemExit(
            f"error: student_push_url {url} serves no model {name!r}; it serves {', '.join(infos)}"
        )
    return PushTarget(client, infos[name], url, owned=True)


def check_follow(info: ModelInfo, dtype: torch.dtype | None, url: str, nbytes: int) -> None:
    """A teacher that cannot take the student's weights is refused at start, not at the first push."""
    where = f"teacher {info.name!r} at {url}"
    if info.black_box:
        raise SystemExit(
            f"error: teacher_follows_student: {where} is black-box (an API); it has no weights to push"
        )
    if info.max_weights_bytes is None:
        raise SystemExit(
            f"error: teacher_follows_student: {where} does not take weight updates; start it with "
            "`opd serve-teacher --weight-updates --model STUDENT_DIR` (or leave --teacher-url out with "
            "self_distillation = true: opd train starts one serving the student)"
        )
    if dtype is None:
        raise SystemExit(
            f"error: teacher_follows_student: {where} holds its weights as {info.dtype}; cannot cast"
        )
    if nbytes > info.max_weights_bytes:
        raise SystemExit(
            f"error: teacher_follows_student: the student's weights are {nbytes} bytes in {info.dtype}, above "
            f"{where}'s max_weights_bytes = {info.max_weights_bytes}: it serves a smaller model than the student "
            "(it must serve the student's architecture)"
        )


def payload_bytes(student: Student, dtype: torch.dtype) -> int:
    """Bytes of the pushed tensors (the lm's own parameters, tied ones once, LoRA adapters merged away)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return size * sum(p.numel() for n, p in student.lm.named_parameters() if ".lora_" not in n)


def student_weights(
    student: Student, lora_scaling: float | None, dtype: torch.dtype | None
) -> dict[str, torch.Tensor] | None:
    """The student's full weights by their HF names, on rank 0 in host memory (None on the other ranks)."""
    lm = student.lm
    state: dict[str, torch.Tensor]
    if is_sharded(lm):  # every rank takes part; with cpu_offload only rank 0 keeps the full tensors
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {
            k: v for k, v in get_model_state_dict(lm, options=options).items() if isinstance(v, torch.Tensor)
        }
    else:
        state = lm.state_dict()
    if not student.world.is_main:
        return None
    if lora_scaling is not None:
        state = merged_lora(state, lora_scaling)
    if getattr(lm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's own tensor: the teacher ties it back
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def merged_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict as the plain model's: W + scaling · B·A for every adapted Linear, under the
    base layer's own name (`q_proj.base_layer.weight` → `q_proj.weight`); the adapters dropped. scaling =
    lora_alpha / r (peft's default, without rsLoRA)."""
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key, a_R_In in state.items():
        match = _LORA_A.match(key)
        if match is None:
            continue
        module, adapter = match["module"], match["adapter"]
        b_Out_R = state[f"{module}.lora_B.{adapter}.weight"]
        weight = f"{module}.weight"
        out[weight] = out[weight] + scaling * (b_Out_R.to(out[weight].dtype) @ a_R_In.to(out[weight].dtype))
    return out
