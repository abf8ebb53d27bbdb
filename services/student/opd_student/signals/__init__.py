"""Teacher signals: one module per kind of teacher feedback, behind the interface of base.py.

- token_scores.py   white-box token scores (POST /v1/score): the sampled token's logprob (reverse_kl), the
                    teacher's top-k + tail (topk_forward_kl, jsd), the student's top-k (student_topk_reverse_kl)
- hidden_states.py  the teacher's exact full distribution from its hidden states and output head
                    (exact_reverse_kl, exact_forward_kl, exact_jsd)
- chunk_rewards.py  a black-box teacher's chunk rewards (POST /v1/chunk-score): loss chunk
- white_box_eval.py --eval-teacher-url: loss chunk's held-out KL to an open copy of the teacher
- policy_gradient.py reverse_kl with the credit, routing and off-policy methods (off-policy correction,
                    GAE-OPD, near-future guidance, LGR, CR-OPD, TRD), and student_topk_reverse_kl's forms
- cross_tokenizer.py a teacher with another tokenizer (cross_tokenizer = true): text scores (POST
                    /v1/score-text) aligned with the student's tokens by byte spans; reverse_kl over spans

`make_signal` picks the implementation for `cfg.loss`; a new signal adds one entry to SIGNALS.
"""

from __future__ import annotations

from collections.abc import Callable

from opd_student.config import TrainConfig
from opd_student.methods.options import MethodOptions
from opd_student.rollout_factory import RolloutFactory
from opd_student.signals.base import TeacherSignal
from opd_student.signals.chunk_rewards import ChunkRewards, keeps_initial_weights
from opd_student.signals.cross_tokenizer import CrossTokenizer
from opd_student.signals.hidden_states import ExactFullVocab
from opd_student.signals.policy_gradient import methods_signal
from opd_student.signals.token_scores import SampledToken, StudentTopK, TeacherTopK
from opd_student.student_model import Student
from opd_student.teacher_link import TeacherLink

Factory = Callable[[TrainConfig, Student, TeacherLink, RolloutFactory, MethodOptions], TeacherSignal]

SIGNALS: dict[str, Factory] = {
    "reverse_kl": SampledToken,
    "topk_forward_kl": TeacherTopK,
    "jsd": TeacherTopK,
    "student_topk_reverse_kl": StudentTopK,
    "exact_reverse_kl": ExactFullVocab,
    "exact_forward_kl": ExactFullVocab,
    "exact_jsd": ExactFullVocab,
    "chunk": lambda cfg, student, link, factory, methods: ChunkRewards(cfg, student, link, factory),
    # not a `loss` value: chosen by make_signal when cross_tokenizer is on and the teacher's tokenizer differs
    "cross_tokenizer": CrossTokenizer,
}

# Which signals need a frozen copy of the initial student (taken before sharding and checkpoint loading).
KEEPS_INITIAL: dict[str, Callable[[TrainConfig], bool]] = {"chunk": keeps_initial_weights}


def make_signal(
    cfg: TrainConfig, student: Student, link: TeacherLink, factory: RolloutFactory, methods: MethodOptions
) -> TeacherSignal:
    if cfg.cross_tokenizer and link.other_tokenizer.get(cfg.teacher_model):
        return SIGNALS["cross_tokenizer"](cfg, student, link, factory, methods)
    methods_ii = methods_signal(cfg)  # credit, routing, off-policy correction (signals/policy_gradient.py)
    if methods_ii is not None:
        return methods_ii(cfg, student, link, factory, methods)
    return SIGNALS[cfg.loss](cfg, student, link, factory, methods)  # same tokenizer: token-level, unchanged


def keeps_initial(cfg: TrainConfig) -> bool:
    rule = KEEPS_INITIAL.get(cfg.loss)
    return bool(rule and rule(cfg))
