"""update_mask, effopd and lm_coef end to end: a tiny student trained for 2-3 steps against a real teacher
service, in-process (the `train` the CLI calls), and the LM-loss mixing's gradient against a direct one."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from helpers import make_tiny_model, start_teacher
from opd_student.config import TrainConfig
from opd_student.metrics_log import read_metrics

FAST = dict(
    prompts_per_step=2,
    samples_per_prompt=2,
    max_new_tokens=8,
    top_k=8,
    eval_num_prompts=2,
    eval_max_new_tokens=4,
    lr=1e-3,
    steps=2,
    save_every=0,
)
Q0 = "model.layers.0.self_attn.q_proj.weight"
MEASURED = ("time/", "tokens_per_s", "timestamp", "mem/")  # clocks and memory: not functions of the run


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(tmp_path_factory.mktemp("rules-teacher"), [f"tiny={tiny_model_dir}"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rules-student") / "student", layers=2, seed=1)


@pytest.fixture
def run(service, student, tmp_path, monkeypatch):
    """run(name, **settings) → (records, run directory) of a finished run."""
    monkeypatch.setenv("OPD_TEACHER_API_KEY", service.api_key)

    def go(name: str = "run", **settings):
        from opd_student.train import train

        where = {"teacher_url": service.http_url, "student": str(student), "out": str(tmp_path / name)}
        cfg = TrainConfig(**{**FAST, **where, **settings})
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:  # train() installs its own SIGINT/SIGTERM handlers: give pytest its own back
            train(cfg)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return [r for r in read_metrics(cfg.out) if not r.get("eval")], tmp_path / name

    return go


def write_mask(path, student, keep) -> None:
    """A mask file as opd analyze-update writes it; keep(name, shape) → bool array."""
    weights = load_file(student / "model.safetensors")
    masks = {n: torch.from_numpy(np.ascontiguousarray(keep(n, v.shape))) for n, v in weights.items()}
    save_file(masks, path, metadata={"format": "opd-update-mask-v1", "threshold": "1e-05"})


def test_update_mask_trains_only_the_masked_coordinates(run, student, tmp_path):
    rng = np.random.default_rng(0)
    half = rng.random(load_file(student / "model.safetensors")[Q0].shape) < 0.5

    def keep(name, shape):
        return half if name == Q0 else np.zeros(shape, dtype=bool)

    write_mask(tmp_path / "mask.safetensors", student, keep)
    records, out = run(update_mask=str(tmp_path / "mask.safetensors"))
    assert all(
        r["update/trained_fraction"] == pytest.approx(half.sum() / sum_numel(student)) for r in records
    )
    before, after = load_file(student / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for name, w in before.items():
        frozen = ~half if name == Q0 else np.ones(w.shape, dtype=bool)
        np.testing.assert_array_equal(after[name][frozen], w[frozen], err_msg=name)  # bit for bit
    assert np.all(after[Q0][half] != before[Q0][half])  # Adam moves every coordinate it trains


def sum_numel(student) -> int:
    return sum(v.size for v in load_file(student / "model.safetensors").values())


def test_a_full_mask_changes_nothing(run, student, tmp_path):
    write_mask(tmp_path / "all.safetensors", student, lambda name, shape: np.ones(shape, dtype=bool))
    plain, _ = run("plain")
    masked, _ = run("masked", update_mask=str(tmp_path / "all.safetensors"))
    for a, b in zip(plain, masked, strict=True):
        assert b.pop("update/trained_fraction") == 1.0
        assert {k: v for k, v in a.items() if not k.startswith(MEASURED)} == {
            k: v for k, v in b.items() if not k.startswith(MEASURED)
        }


def test_update_mask_refusals(run, student, tmp_path):
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(update_mask="m.safetensors", weight_decay=0.01)
    with pytest.raises(ValueError, match="LoRA"):
        TrainConfig(effopd=True, lora=True)
    write_mask(tmp_path / "m.safetensors", student, lambda name, shape: np.ones(shape, dtype=bool))
    masks = load_file(tmp_path / "m.safetensors")
    masks.pop(Q0)
    save_file(
        {n: torch.from_numpy(v) for n, v in masks.items()},
        tmp_path / "short.safetensors",
        metadata={"format": "opd-update-mask-v1"},
    )
    with pytest.raises(SystemExit, match=f"1 parameters have no mask.*{Q0}"):
        run("short", update_mask=str(tmp_path / "short.safetensors"))
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(SystemExit, match="not an update mask"):
        run("plain-file", update_mask=str(tmp_path / "plain.safetensors"))


def test_effopd_freezes_the_slow_modules_after_the_probe(run, student):
    records, out = run(
        effopd=True, effopd_probe_steps=1, effopd_keep_fraction=0.3, steps=3, save_every=1, keep_checkpoints=3
    )
    decision = json.loads((out / "effopd.json").read_text())
    kept, movement = set(decision["kept"]), decision["movement"]
    numel = {n: v.size for n, v in load_file(student / "model.safetensors").items()}
    # the kept modules are the fastest-moving, and just reach 30 % of the parameters
    ranked = sorted(movement, key=lambda n: (-movement[n], n))
    assert kept == set(ranked[: len(kept)])
    held = sum(numel[n] for n in kept)
    assert held >= 0.3 * sum(numel.values()) > held - numel[ranked[len(kept) - 1]]
    assert records[0]["effopd/kept_modules"] == len(kept)
    assert records[1]["effopd/trained_fraction"] == pytest.approx(held / sum(numel.values()))
    # after the probe step the frozen modules never move again, the kept ones do
    probe = load_checkpoint_weights(out / "checkpoints" / "step-000001")
    final = load_file(out / "final" / "model.safetensors")
    for name in numel:
        same = np.array_equal(final[name], probe[name])
        assert same == (name not in kept), name


def load_checkpoint_weights(path) -> dict[str, np.ndarray]:
    from opd_student.checkpoint import checkpoint_weights

    return {k: v.float().numpy() for k, v in checkpoint_weights(path).items()}


def test_lm_mix_logs_the_text_loss(run):
    records, _ = run(lm_coef=0.3, lm_batch_size=3, lm_max_tokens=16)
    for r in records:
        assert 0 < r["lm/tokens"] <= 3 * 17 and r["lm/nll"] > 0


def test_lm_mix_gradient_is_the_convex_combination(student, tmp_path):
    """add_gradients turns a complete gradient g into (1 − α)·g + α·∇(mean NLL of the step's texts)."""
    from opd_student.methods.lm_mix import LMLossMix, load_lm_texts
    from opd_student.rollouts import pack
    from opd_student.student_model import Student

    lines = [
        {"text": "The quick brown fox jumps over the lazy dog."},
        {"prompt": "Hi", "completion": "Hello there"},
    ]
    (tmp_path / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = TrainConfig(student=str(student), bf16="false", weights_dtype="float64", micro_batch_size=1)
    model = Student.load(student, cfg, torch.device("cpu"))
    texts = load_lm_texts(str(tmp_path / "lm.jsonl"), model.tokenizer, max_tokens=64)
    assert texts[1].completion_ids[-1] == model.eos_token_id  # a completion ends with EOS
    mix = LMLossMix(0.25, texts, batch_size=2, seed=0)
    params = model.parameters()
    g = [torch.randn_like(p) for p in params]
    for p, gp in zip(params, g, strict=True):
        p.grad = gp.clone()
    metrics = mix.add_gradients(model, params, step_index=0, micro_batch_size=1)

    rows = mix.texts_for(0)
    batch = pack(rows, model.pad_token_id)
    lp = model.logprobs(batch).gather(-1, batch.targets_B_T[..., None])[..., 0]
    nll = -(lp * batch.mask_B_T).sum() / batch.mask_B_T.sum()
    direct = torch.autograd.grad(nll, params)
    assert metrics["lm/nll"] == pytest.approx(float(nll), rel=1e-6)  # log q is fp32
    assert metrics["lm/tokens"] == int(batch.mask_B_T.sum())
    for p, gp, d in zip(params, g, direct, strict=True):
        torch.testing.assert_close(p.grad, 0.75 * gp + 0.25 * d, rtol=1e-6, atol=1e-7)
    assert [r.completion_ids for r in mix.texts_for(1)] == [r.completion_ids for r in mix.texts_for(1)]
    assert sorted(id(r) for r in mix.texts_for(0)) == sorted(id(t) for t in texts)  # an epoch: each once


def test_default_reference_texts(student):
    from transformers import AutoTokenizer

    from opd_student.methods.lm_mix import load_lm_texts

    tokenizer = AutoTokenizer.from_pretrained(student)
    texts = load_lm_texts("default-reference", tokenizer, max_tokens=128)
    assert len(texts) == 58
    assert (
        tokenizer.decode(texts[0].completion_ids, skip_special_tokens=True)
        == "Tokyo is the capital of Japan."
    )
