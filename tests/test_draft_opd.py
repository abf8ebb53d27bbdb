"""Draft-OPD (issue 21, item 4): the acceptance-length measurement against a direct draft-and-verify loop,
the reading's premise (error positions from one teacher-forced forward equal those of draft-and-verify
rounds), and a 2-step real run against a real teacher service whose rollouts are the teacher's greedy answers
and blocks replayed from the student's error positions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import start_teacher, train_in_process
from opd_bench.draft_acceptance import assisted_counts, reference_cycles
from opd_student.config import TrainConfig
from opd_student.methods import draft_rollouts
from opd_student.methods.draft_rollouts import error_positions
from opd_student.metrics_log import read_metrics

EOS = 2  # the tiny service model's
PROMPTS = [[1, 9, 31, 25, 13, 28], [1, 50, 21, 17], [1, 10, 47, 8, 9, 10, 11, 12, 13]]
NEVER = 0  # an end-of-sequence id the 64-token pair below never emits: every generation runs its length


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    """A random 64-token LM whose greedy answers depend on the context (a sharpened untied head)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=NEVER,
        pad_token_id=NEVER,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def pair():
    """(teacher, draft): a tiny LM and a copy with noise on one layer, so that drafts are partly accepted."""
    teacher, draft = tiny_lm(), tiny_lm()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.model.layers[1].parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return teacher, draft


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
def test_assisted_generation_counts_equal_draft_and_verify_written_out(pair, draft_tokens):
    teacher, draft = pair
    accepted = drafted = 0
    for ids in PROMPTS:
        generated, forwards = assisted_counts(teacher, draft, ids, 24, draft_tokens, NEVER)
        expected, cycles, errors, _ = reference_cycles(teacher, draft, ids, 24, draft_tokens, NEVER)
        assert generated == expected
        assert forwards == cycles
        accepted += len(generated) - cycles
        drafted += cycles * draft_tokens
        assert len(errors) <= cycles
    assert 0 < accepted < drafted  # the pair is a real test: some drafted tokens kept, some rejected


def test_a_draft_equal_to_the_teacher_is_always_accepted(pair):
    teacher, same = pair[0], tiny_lm()  # its own object: the forward hook counts the teacher's forwards
    for ids in PROMPTS:
        generated, forwards = assisted_counts(teacher, same, ids, 21, 4, NEVER)
        assert len(generated) == 21
        assert forwards == 5  # 4 accepted + 1 per cycle, then one last token alone
        _, _, errors, _ = reference_cycles(teacher, teacher, ids, 21, 4, NEVER)
        assert errors == []


@pytest.mark.parametrize("draft_tokens", [1, 2, 4, 7])
def test_error_positions_of_one_teacher_forced_forward_are_draft_and_verify_errors(pair, draft_tokens):
    """Every verification error is a teacher-forced disagreement, and every disagreement at a position the
    draft proposed is a verification error; the others fall where the teacher added its bonus token after a
    fully accepted block (another block size would have the draft propose there)."""
    teacher, draft = pair
    for ids in PROMPTS:
        run = reference_cycles(teacher, draft, ids, 30, draft_tokens, NEVER)
        with torch.no_grad():
            logits = draft(torch.tensor([ids + run.generated])).logits[0, len(ids) - 1 : -1]
        disagreements = error_positions(logits.argmax(-1).tolist(), run.generated)
        assert [t for t in disagreements if t in run.drafted] == run.errors
        if draft_tokens == 1:
            assert len(disagreements) > len(run.errors)  # some fall on bonus positions


def test_error_positions_hand_made():
    assert error_positions([5, 6, 7, 8], [5, 9, 7, 1]) == [1, 3]
    assert error_positions([], []) == []


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss="reverse_kl"), "needs a loss over the distribution"),
        (dict(loss="chunk"), "needs a loss over the distribution"),
        (dict(draft_block=0), "draft_block must be >= 1"),
        (dict(draft_replays=-1), "draft_replays must be >= 0"),
        (dict(trb_epsilon=0.1), "not with trb_epsilon"),
    ],
)
def test_draft_opd_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"draft_opd": True, "loss": "exact_reverse_kl", **settings})


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(tmp_path_factory.mktemp("draft-teacher"), [f"tiny={tiny_model_dir}"])
    yield proc
    proc.stop()


def untied_student(teacher_dir, out):
    """A random student with the tiny teacher's tokenizer and an untied head: the tied tiny teacher mostly
    repeats the last token, this one does not, so there are errors to replay."""
    from transformers import AutoTokenizer

    config = LlamaConfig.from_pretrained(teacher_dir)
    config.tie_word_embeddings = False
    config.num_hidden_layers = 2
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def test_two_step_run_distils_on_teacher_answers_and_replays(
    service, tiny_model_dir, tmp_path_factory, monkeypatch
):
    monkeypatch.setenv("OPD_TEACHER_API_KEY", service.api_key)
    student = untied_student(tiny_model_dir, tmp_path_factory.mktemp("draft-student"))
    made: list = []
    original = draft_rollouts.DraftRollouts.rollouts

    def spy(self, prompts, prompt_ids, index, horizon):
        out = original(self, prompts, prompt_ids, index, horizon)
        made.append((prompt_ids, horizon, out))
        return out

    monkeypatch.setattr(draft_rollouts.DraftRollouts, "rollouts", spy)
    out = tmp_path_factory.mktemp("draft-run") / "run"
    cfg = TrainConfig(
        teacher_url=service.http_url,
        student=str(student),
        out=str(out),
        loss="exact_reverse_kl",
        draft_opd=True,
        draft_block=3,
        draft_replays=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=10,
        eval_num_prompts=2,
        eval_max_new_tokens=4,
        steps=2,
        save_every=0,
        lr=1e-3,
        max_staleness=1,  # both steps' rollouts are drawn before the first update: by the initial student
    )
    train_in_process(cfg)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    initial = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    assert len(made) == 2
    for prompt_ids_P, horizon, (rollouts, metrics) in made:
        P = len(prompt_ids_P)
        answers, replays = rollouts[:P], rollouts[P:]
        for ids, answer in zip(prompt_ids_P, answers, strict=True):
            greedy = teacher.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=horizon,
                eos_token_id=EOS,
                pad_token_id=EOS,
            )[0, len(ids) :].tolist()
            assert answer.prompt_ids == ids
            assert answer.completion_ids == greedy[: len(answer.completion_ids)]
        errors_P = []
        for a in answers:  # the initial student's disagreements with the teacher's answer, computed here
            with torch.no_grad():
                logits = initial(torch.tensor([a.prompt_ids + a.completion_ids])).logits[0]
            argmax = logits[len(a.prompt_ids) - 1 : -1].argmax(-1).tolist()
            errors_P.append(error_positions(argmax, a.completion_ids))
        G = cfg.samples_per_prompt
        assert len(replays) == sum(G * min(cfg.draft_replays, len(e)) for e in errors_P) > 0
        for r in replays:  # G blocks drafted from the prompt and an error position's prefix of its answer
            p = next(p for p, a in enumerate(answers) if r.prompt_ids[: len(a.prompt_ids)] == a.prompt_ids)
            prefix = r.prompt_ids[len(answers[p].prompt_ids) :]
            assert prefix == answers[p].completion_ids[: len(prefix)]
            assert len(prefix) in errors_P[p]
            assert 1 <= len(r.completion_ids) <= cfg.draft_block
        assert metrics["draft/replays"] == len(replays)
        assert metrics["draft/errors"] == sum(len(e) for e in errors_P)
        tokens = sum(len(a.completion_ids) for a in answers)
        assert metrics["teacher/sampling_positions"] == tokens
        assert metrics["draft/argmax_match"] == pytest.approx(1 - metrics["draft/errors"] / tokens)
    records = [r for r in read_metrics(out) if not r.get("eval")]
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "final" / "config.json").exists()
