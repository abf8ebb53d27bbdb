"""FiRe-OPD style filtering and reweighting on hand-made cases, and the step's weighted-mean gradient."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opd_client.scores import SequenceScores
from opd_student.methods.filtering import confidence_weights, rollout_keep_mask, teacher_mean_logprobs
from opd_student.methods.step_weights import StepWeights
from opd_student.methods.token_mask import TokenMaskRule
from opd_student.rollouts import Rollout, pack, teacher_tensors

MEANS = [-1.0, -3.0, -0.5, -2.0, -4.0, -0.1, -2.5, -1.5, -0.7, -3.5]


@pytest.mark.parametrize(
    ("fraction", "dropped"),
    [(0.0, []), (0.2, [4, 9]), (0.25, [4, 9]), (0.3, [1, 4, 9]), (0.09, [])],
)
def test_the_bottom_fraction_by_teacher_mean_logprob_is_dropped(fraction, dropped):
    keep = rollout_keep_mask(torch.tensor(MEANS), fraction)
    assert torch.nonzero(~keep).flatten().tolist() == dropped


def test_ties_drop_the_earlier_rollout_and_bad_fractions_are_refused():
    assert rollout_keep_mask(torch.tensor([-1.0, -1.0, -1.0, 0.0]), 0.5).tolist() == [
        False,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError):
        rollout_keep_mask(torch.tensor(MEANS), 1.0)


def test_teacher_mean_logprob_per_rollout():
    got = teacher_mean_logprobs([torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5]), torch.tensor([])])
    assert got.tolist() == [-2.0, -0.5, 0.0]


def test_confidence_weights_are_teacher_confidence_times_student_doubt():
    # V = 4; the teacher's top-2 (not sorted at position 1: its argmax is the second entry).
    q = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1], [0.1, 0.2, 0.3, 0.4]]])
    ids = torch.tensor([[[0, 1], [3, 2], [1, 0]]])
    p = torch.tensor([[[0.9, 0.05], [0.2, 0.6], [0.5, 0.3]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = confidence_weights(q.log(), ids, p.log(), mask)[0].tolist()
    # position 0: 0.9 · (1 − q[0]=0.7); position 1: argmax is id 2 with 0.6 → 0.6 · (1 − 0.4); 2: padding
    assert got == pytest.approx([0.9 * 0.3, 0.6 * 0.6, 0.0], rel=1e-5)


def _case():
    """Five rollouts with teacher scores over a 5-token vocabulary."""
    rng = np.random.default_rng(0)
    lengths, V, K = [3, 5, 2, 4, 1], 5, 2
    rollouts, scores = [], []
    for i, T in enumerate(lengths):
        completion = rng.integers(0, V, size=T).tolist()
        rollouts.append(Rollout([1, 2], completion, prompt_id=str(i)))
        top_lp = np.sort(np.log(rng.dirichlet(np.ones(V), size=T)), axis=-1)[:, ::-1][:, :K].copy()
        scores.append(
            SequenceScores(
                token_logprobs_T=np.log(rng.uniform(0.05, 0.9, size=T)).astype(np.float32),
                top_ids_T_K=rng.permuted(np.tile(np.arange(V), (T, 1)), axis=1)[:, :K].astype(np.int32),
                top_logprobs_T_K=top_lp.astype(np.float32),
                tail_logprob_T=np.log1p(-np.exp(top_lp).sum(-1)).astype(np.float32),
            )
        )
    return rollouts, scores


def test_weighted_mean_gradient_equals_one_big_batch():
    """Micro-batches of Σ w ℓ / N plus the N / Σ w rescale give exactly ∇(Σ w ℓ / Σ w), with FiRe's
    filter (1 of 5 rollouts), its student-dependent weights and a token-id rule all on."""
    rollouts, scores = _case()
    cfg = SimpleNamespace(
        fire_opd=True, fire_drop_fraction=0.2, fire_reweight=True, ta_opd=False, micro_batch_size=2
    )
    rule = TokenMaskRule(token_ids=frozenset({0, 1, 2, 3}))  # id 4 never counts
    theta = torch.randn(5, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def logprobs(batch):  # one distribution per position, shifted by the position so weights vary
        shift = batch.positions_B_T.float()[..., None] * 0.3
        return torch.log_softmax(theta + shift * torch.arange(5.0), dim=-1)

    weights = StepWeights(cfg, rollouts, scores, None, rule)
    assert weights.active and weights.dropped_rollouts == 1
    N = sum(len(r.completion_ids) for r in rollouts)
    for start in range(0, len(rollouts), 2):
        idx = list(range(start, min(start + 2, len(rollouts))))
        batch = pack([rollouts[i] for i in idx], 0)
        teacher = teacher_tensors([scores[i] for i in idx], batch.mask_B_T.shape[1])
        lp = logprobs(batch)
        loss_B_T = -lp.gather(-1, batch.targets_B_T[..., None])[..., 0] * batch.mask_B_T
        w = weights.micro_batch(idx, lp, teacher, batch.mask_B_T)
        ((loss_B_T * w).sum() / N).backward()
    weights.rescale_gradients([theta])
    got = theta.grad.clone()

    # Direct: all rollouts in one batch, weights written out from the definitions.
    theta.grad = None
    batch = pack(rollouts, 0)
    teacher = teacher_tensors(scores, batch.mask_B_T.shape[1])
    lp = logprobs(batch)
    means = [float(np.mean(s.token_logprobs_T)) for s in scores]
    dropped = int(np.argmin(means))
    w = torch.zeros_like(batch.mask_B_T)
    for b, r in enumerate(rollouts):
        for t, token in enumerate(r.completion_ids):
            if b == dropped or token == 4:
                continue
            k = int(teacher.top_logprobs_B_T_K[b, t].argmax())
            p_max = float(teacher.top_logprobs_B_T_K[b, t, k].exp())
            q_teacher_choice = float(lp[b, t, teacher.top_ids_B_T_K[b, t, k]].detach().exp())
            w[b, t] = p_max * (1 - q_teacher_choice)
    loss_B_T = -lp.gather(-1, batch.targets_B_T[..., None])[..., 0] * batch.mask_B_T
    ((loss_B_T * w).sum() / w.sum()).backward()
    assert torch.allclose(got, theta.grad, rtol=1e-5, atol=1e-7)
    assert weights.weight_sum == pytest.approx(float(w.sum()), rel=1e-5)
    assert weights.tokens_in_loss == int((w > 0).sum())
    metrics = weights.metrics()
    assert metrics["select/rollouts_dropped"] == 1 and 0 < metrics["select/token_fraction"] < 1


def test_no_method_leaves_the_loss_alone():
    rollouts, scores = _case()
    cfg = SimpleNamespace(fire_opd=False, fire_drop_fraction=0.2, fire_reweight=True, ta_opd=False)
    weights = StepWeights(cfg, rollouts, scores, None, TokenMaskRule())
    batch = pack(rollouts[:2], 0)
    assert not weights.active
    assert weights.micro_batch([0, 1], None, None, batch.mask_B_T) is None
    assert weights.metrics() == {} and weights.loss_denominator() == 15
