"""Several teachers: routing rules and per-teacher metrics on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from opd_student.methods.routing import parse_teacher_rules, route, teachers_used
from opd_student.methods.teacher_metrics import TeacherMetrics
from opd_student.prompts import Prompt

MATH = Prompt(id="m", messages=[{"role": "user", "content": "What is 15 plus 27?"}])
POEM = Prompt(id="p", prompt="Write a short Poem about rain.")
PINNED = Prompt(id="x", prompt="What is 2 + 2?", teacher="big")
OTHER = Prompt(
    id="o", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
)


def test_rules_parse_and_route_in_order():
    rules = parse_teacher_rules(
        r"\d+ *(plus|\+) *\d+ => math; (?i)poem|story => writer" + "\n(?i)brief => terse"
    )
    assert [name for _, name in rules] == ["math", "writer", "terse"]
    assert route(MATH, rules, "general") == "math"
    assert route(POEM, rules, "general") == "writer"
    assert route(PINNED, rules, "general") == "big"  # the prompt file's field wins over rules
    assert route(OTHER, rules, "general") == "terse"  # every message's content is matched
    assert route(Prompt(id="n", prompt="Name a colour."), rules, None) is None  # the service's first
    assert teachers_used([MATH, POEM, MATH, PINNED], rules, None) == ["math", "writer", "big"]


@pytest.mark.parametrize("bad", ["math", "=> math", r"\d+ =>", "(unclosed => x"])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ValueError, match="teacher_rules"):
        parse_teacher_rules(bad)


def test_per_teacher_metrics_against_direct_sums():
    metrics = TeacherMetrics()
    kl = torch.tensor([[0.5, 0.3, 0.0], [0.2, 0.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    metrics.add(["math", None], kl, lp, mask)
    metrics.add(
        ["math"], torch.tensor([[0.1, 0.1, 0.1]]), torch.tensor([[-1.0, -1.0, -1.0]]), torch.ones(1, 3)
    )
    got = metrics.record()
    assert got["kl/sampled_reverse/math"] == pytest.approx((0.5 + 0.3 + 0.3) / 5)
    assert got["teacher/logprob/math"] == pytest.approx((-3.0 - 3.0) / 5)
    assert got["teacher/tokens/math"] == 5 and got["teacher/rollouts/math"] == 2
    assert got["kl/sampled_reverse/default"] == pytest.approx(0.2)
    assert got["teacher/logprob/default"] == pytest.approx(-0.5) and got["teacher/rollouts/default"] == 1
