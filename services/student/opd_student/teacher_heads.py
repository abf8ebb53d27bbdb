"""The teachers' output heads on the trainer's side: downloaded once per teacher (and cached on disk by
sha256, opd_client.head_cache), kept in fp32 on the student's device for the exact losses and evaluation."""

from __future__ import annotations

import torch

from opd_client.errors import OpdError
from opd_client.head import TeacherHead
from opd_client.http_client import HttpTeacherClient
from opd_client.schema import ModelInfo


def offers_hidden_states(info: ModelInfo) -> bool:
    """Whether a teacher serves hidden states and a head (a white-box model whose logits are h · Wᵀ)."""
    return bool(info.hidden_size and info.head_sha256)


class TeacherHeads:
    """name → head; None is the service's default teacher, as in a score request without a model."""

    def __init__(self, client: HttpTeacherClient, device: torch.device) -> None:
        self.client, self.device = client, device
        self._heads: dict[str | None, TeacherHead] = {}

    def __call__(self, name: str | None) -> TeacherHead:
        head = self._heads.get(name)
        if head is None:
            try:
                head = self.client.teacher_head(name).to(self.device, torch.float32)
            except OpdError as e:
                raise SystemExit(
                    f"error: cannot get teacher {name or '(default)'!r}'s output head: {e}"
                ) from e
            self._heads[name] = head
        return head
