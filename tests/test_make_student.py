"""`opd make-student`: layer removal by measured harm, checked against direct computations.

Fast tests prune a tiny random 6-layer model to 3 layers; the slow test makes the real default student
(the embedded 30-layer teacher pruned to 20) and reports its KL and time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import make_tiny_model
from opd_student.tools import make_student as ms
from opd_student.tools.layer_pruning import build_pruned_model

TEACHER_LAYERS = 6
KEEP = 3
SEED = 0
NEW_TOKENS = 16  # per held-out prompt; the default 48 only costs time here


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    """A tiny random 6-layer model whose layers matter unequally (random init barely moves the residual
    stream, so every removal would cost ~0 and the order would be noise)."""
    models = tmp_path_factory.mktemp("models")
    base = make_tiny_model(models / "tiny6-base", layers=TEACHER_LAYERS, seed=3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    scales = torch.empty(TEACHER_LAYERS).uniform_(4, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer, scale in zip(model.model.layers, scales.tolist(), strict=True):
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(models / "tiny6")
    AutoTokenizer.from_pretrained(base).save_pretrained(models / "tiny6")
    return models / "tiny6"


def make(teacher_dir, out, layers=KEEP, strategy="greedy") -> dict:
    return ms.make_student(
        str(teacher_dir),
        layers,
        out,
        device="cpu",
        seed=SEED,
        strategy=strategy,
        search_dtype="float32",
        new_tokens=NEW_TOKENS,
    )


@pytest.fixture(scope="module")
def made(tiny6, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "tiny3"
    return out, make(tiny6, out)


@pytest.fixture(scope="module")
def teacher(tiny6):
    return AutoModelForCausalLM.from_pretrained(tiny6, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def direct_kl(tiny6, teacher):
    """KL(teacher ‖ a separately built pruned model) on the held-out batch make_student measured on (same
    seed, same model, CPU), from full logits, without any of the search's shortcuts."""
    held_out = ms.make_held_out(teacher, AutoTokenizer.from_pretrained(tiny6), SEED, NEW_TOKENS)
    C = held_out.completion_len
    inputs = dict(
        input_ids=held_out.input_ids_B_L,
        attention_mask=held_out.attention_mask_B_L,
        position_ids=held_out.position_ids_B_L,
        use_cache=False,
    )
    mask_B_C = held_out.completion_mask_B_C.float()
    assert mask_B_C.sum() > 0

    def completion_logprobs(model):
        with torch.no_grad():  # position t predicts token t+1: the C completion tokens come from -C-1 .. -2
            return torch.log_softmax(model(**inputs).logits[:, -C - 1 : -1], -1)

    teacher_logp = completion_logprobs(teacher)

    def kl(kept: list[int]) -> float:
        student_logp = completion_logprobs(build_pruned_model(teacher, kept))
        kl_B_C = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
        return float((kl_B_C * mask_B_C).sum() / mask_B_C.sum())

    return kl


def test_student_loads_with_n_layers(made, tiny6):
    out, record = made
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == KEEP
    assert len(model.model.layers) == KEEP
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(KEEP))
    assert model.num_parameters() == record["params"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert (
        tokenizer.padding_side == AutoTokenizer.from_pretrained(tiny6).padding_side
    )  # left only while sampling


def test_student_json_is_consistent(made, tiny6):
    out, record = made
    assert json.loads((out / "student.json").read_text()) == record
    assert record["teacher"] == str(tiny6)
    assert record["teacher_layers"] == TEACHER_LAYERS
    assert (record["strategy"], record["search_dtype"]) == ("greedy", "float32")
    assert record["search_kl_after_each_removal"] == record["kl_after_each_removal"]
    assert record["evaluations"] == 6 + 5 + 4  # true greedy: every remaining layer, every round
    assert len(record["kept_layers"]) == KEEP
    assert record["kept_layers"] == sorted(record["kept_layers"])
    assert len(record["removed_layers"]) == TEACHER_LAYERS - KEEP
    assert sorted(record["kept_layers"] + record["removed_layers"]) == list(range(TEACHER_LAYERS))
    kls = record["kl_after_each_removal"]
    assert len(kls) == TEACHER_LAYERS - KEEP
    assert record["final_kl"] == kls[-1]
    assert all(math.isfinite(kl) and kl > 0 for kl in kls)


def test_student_logits_equal_teacher_with_layers_skipped(made, teacher):
    """Expected logits from running the teacher's own kept layers by hand (no pruned model involved)."""
    out, record = made
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids_1_L = torch.randint(0, teacher.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = teacher.model.embed_tokens(ids_1_L)
        positions = torch.arange(ids_1_L.shape[1])[None]
        rotary = teacher.model.rotary_emb(hidden, position_ids=positions)
        for i in record["kept_layers"]:
            hidden = teacher.model.layers[i](hidden, position_ids=positions, position_embeddings=rotary)
        expected = teacher.lm_head(teacher.model.norm(hidden))
        got = student(input_ids=ids_1_L).logits
        full = teacher(input_ids=ids_1_L).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert (full - expected).abs().max().item() > 1e-2  # the removal did change something


def test_student_kv_cache_matches_full_forward(made):
    """Renumbered layer_idx: incremental decoding with the cache gives the same logits as one forward."""
    out, _ = made
    student = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids_1_L = torch.randint(0, student.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = student(input_ids=ids_1_L).logits[0, -1]
        first = student(input_ids=ids_1_L[:, :-1], use_cache=True)
        step = student(input_ids=ids_1_L[:, -1:], cache=first.cache, use_cache=True)
    assert (step.logits[0, -1] - full).abs().max().item() < 1e-4


def test_greedy_matches_direct_greedy(made, direct_kl):
    """Every round removes the layer whose removal (evaluated directly, one pruned model each) hurts least."""
    _, record = made
    kept = list(range(TEACHER_LAYERS))
    for round_, (removed, kl) in enumerate(
        zip(record["removed_layers"], record["kl_after_each_removal"], strict=True)
    ):
        kl_by_layer = {i: direct_kl([k for k in kept if k != i]) for i in kept}
        best = min(kl_by_layer, key=kl_by_layer.get)
        assert removed == best, f"round {round_ + 1}: removed {removed}, direct KLs {kl_by_layer}"
        assert kl == pytest.approx(kl_by_layer[best], rel=1e-4)
        kept.remove(removed)
    assert kept == record["kept_layers"]


def test_cli_ranked_removes_in_single_removal_order(tiny6, direct_kl, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="opd")
    ms.register(parser.add_subparsers())
    out = tmp_path / "ranked"
    argv = ["make-student", "--teacher", str(tiny6), "--layers", str(KEEP), "--out", str(out)]
    flags = [
        "--strategy",
        "ranked",
        "--search-dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--held-out-tokens",
        "16",
    ]
    args = parser.parse_args([*argv, *flags])
    args.func(args)
    record = json.loads((out / "student.json").read_text())
    full = list(range(TEACHER_LAYERS))
    single = {i: direct_kl([k for k in full if k != i]) for i in full}
    assert (record["strategy"], record["search_dtype"]) == ("ranked", "bfloat16")
    # the bfloat16 ranking agrees with float32 here (the single-removal KLs are >5% apart) ...
    assert record["removed_layers"] == sorted(full, key=single.get)[: TEACHER_LAYERS - KEEP]
    # ... and the recorded KLs are re-measured in float32, the search's own are close to them
    removed = record["removed_layers"]
    expected = [direct_kl([k for k in full if k not in removed[: n + 1]]) for n in range(len(removed))]
    assert record["kl_after_each_removal"] == pytest.approx(expected, rel=1e-4)
    assert record["search_kl_after_each_removal"] == pytest.approx(expected, rel=0.05)
    assert record["search_kl_after_each_removal"] != record["kl_after_each_removal"]
    assert "round  1: removed layer" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="not empty"):
        args.func(args)
    args = parser.parse_args(
        ["make-student", "--teacher", str(tiny6), "--layers", "7", "--out", str(tmp_path / "x")]
    )
    with pytest.raises(SystemExit, match=r"--layers must be in 1\.\.6"):
        args.func(args)


def test_resolve_student(made, tmp_path):
    out, _ = made
    assert ms.resolve_student(str(out)) == out
    with pytest.raises(FileNotFoundError, match="config.json"):
        ms.resolve_student(str(tmp_path / "nothing-here"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the greedy search: ~100 s idle, several times that on busy shared cores
def test_default_student_is_made_once_and_reported(tmp_path, monkeypatch):
    """The real default: 30 → 20 layers of the embedded teacher, in a fresh cache (teacher conversion reused)."""
    from opd_common.embedded import embedded_teacher_dir

    teacher_models = embedded_teacher_dir().parent
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    os.symlink(teacher_models, tmp_path / "models")
    started = time.perf_counter()
    path = ms.default_student_dir()
    seconds = time.perf_counter() - started
    record = json.loads((path / "student.json").read_text())
    print(
        f"\ndefault student: {seconds:.0f} s, strategy {record['strategy']}, removed {record['removed_layers']}, "
        f"final KL {record['final_kl']:.3f} nats/token, {record['params'] / 1e6:.1f}M params"
    )
    assert path == tmp_path / "students" / "smollm2-135m-instruct-20L"
    assert len(record["kept_layers"]) == 20 and record["teacher_layers"] == 30
    assert 0 < record["final_kl"] < 3.0  # measured 1.94; every third layer removed: 8.7
    assert ms.resolve_student("default") == path
    # cached: a second call makes nothing (counted, not timed)
    monkeypatch.setattr(ms, "make_student", lambda *a, **k: pytest.fail("made the default student twice"))
    assert ms.default_student_dir() == path
    assert not (path.parent / (path.name + ".tmp")).exists()
