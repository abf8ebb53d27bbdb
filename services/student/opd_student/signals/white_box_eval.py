"""`--eval-teacher-url`: what a black-box signal buys, measured against an open copy of the teacher.

The chunk reward says how often the API teacher would have said the same; it is not a distance to the
teacher. A user who also has the model's weights (or one close to it) can serve them with
`opd serve-teacher` and name that service here: every held-out evaluation of `--loss chunk` then also
reports the sampled reverse KL and the top-k forward KL to it (opd_student.evaluation), on the same seeded
held-out samples, under the same keys as the white-box losses (eval/reverse_kl, ...).
"""

from __future__ import annotations

import os

from opd_student.config import TrainConfig
from opd_student.evaluation import eval_summary, evaluate
from opd_student.prompts import Prompt
from opd_student.rollout_factory import RolloutFactory
from opd_student.signals.base import EvalResult
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink


class WhiteBoxEval:
    """The held-out KL to the white-box service at cfg.eval_teacher_url (checked at start)."""

    def __init__(self, cfg: TrainConfig, student: Student, factory: RolloutFactory) -> None:
        assert cfg.eval_teacher_url is not None
        api_key = os.environ.get(cfg.eval_teacher_api_key_env) or os.environ.get(cfg.teacher_api_key_env)
        self.cfg, self.factory = cfg, factory
        self.link = TeacherLink(
            cfg.eval_teacher_url,
            api_key,
            cfg.teacher_timeout_s,
            cfg.max_inflight_requests,
            cfg.teacher_wait_s,
        )
        info = self.link.check(student.tokenizer, None)
        if info.black_box:
            raise SystemExit(
                f"error: --eval-teacher-url {cfg.eval_teacher_url}: teacher {info.name!r} is black-box; the "
                "held-out KL needs a white-box service (opd serve-teacher --model ...)"
            )

    def evaluate(self, student: Student, prompts: list[Prompt], seed: int) -> EvalResult:
        result = evaluate(
            student.scorer,
            student.tokenizer,
            self.link,
            prompts,
            self.factory,
            self.cfg.eval_max_new_tokens,
            seed=seed,
            world=student.world,
        )
        return EvalResult(result, f"white-box {eval_summary(result)}")
