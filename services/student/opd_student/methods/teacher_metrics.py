"""Per-teacher numbers of one optimizer step, for runs that route prompts to several teachers.

Keys (NAME = the teacher's name, "default" for the service's first): `kl/sampled_reverse/NAME` (mean
log q − log p over that teacher's tokens; `opd report` plots it next to the overall KL),
`teacher/logprob/NAME`, `teacher/tokens/NAME`, `teacher/rollouts/NAME`. Under torchrun they are the sums
over all ranks, as the overall numbers are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd_student.distributed import SINGLE, World


class TeacherMetrics:
    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}  # name -> [kl_sum, teacher_logprob_sum, tokens, rollouts]

    def add(
        self, names_B: list[str | None], kl_B_T: Tensor, teacher_logprobs_B_T: Tensor, mask_B_T: Tensor
    ) -> None:
        """One micro-batch: kl_B_T is the masked sampled reverse KL per token, names_B the teachers."""
        mask_B_T = mask_B_T.float()
        kl_B = kl_B_T.detach().float().sum(-1)
        lp_B = torch.where(mask_B_T > 0, teacher_logprobs_B_T.float(), 0.0).sum(-1)  # padding may be NaN
        tokens_B = mask_B_T.sum(-1)
        for b, name in enumerate(names_B):
            sums = self._sums.setdefault(name or "default", [0.0, 0.0, 0.0, 0.0])
            sums[0] += float(kl_B[b])
            sums[1] += float(lp_B[b])
            sums[2] += float(tokens_B[b])
            sums[3] += 1

    def record(self, world: World = SINGLE) -> dict[str, float | int]:
        """The step's numbers per teacher, over all of the world's ranks."""
        # Ranks may have seen different teachers: agree on the names, then sum one flat vector.
        names = sorted(set().union(*world.gather(set(self._sums))))
        flat = world.sum([v for n in names for v in self._sums.get(n, [0.0, 0.0, 0.0, 0.0])])
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            kl, lp, tokens, rollouts = flat[4 * i : 4 * i + 4]
            out[f"kl/sampled_reverse/{name}"] = kl / max(tokens, 1.0)
            out[f"teacher/logprob/{name}"] = lp / max(tokens, 1.0)
            out[f"teacher/tokens/{name}"] = int(tokens)
            out[f"teacher/rollouts/{name}"] = int(rollouts)
        return out
