"""Activation steering (SafeSteer's steered teacher): `opd make-steering-vector` against the model's own
hidden states, and a steered `opd serve-teacher` against an in-process computation: its scores differ from
the plain teacher's exactly as adding α·v after decoder layer ℓ predicts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import start_teacher
from opd_client import HttpTeacherClient
from opd_student.prompts import load_prompts, render
from opd_teacher.backends.steering import SteeringOptions, attach_steering

LAYER, SCALE = 1, 3.0
TOP_K = 5


def hand_made_vector(hidden: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).normal(size=hidden).astype(np.float32))


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("steer") / "v.safetensors"
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    metadata = {"format": "opd-steering-vector-v1", "layer": str(LAYER)}
    save_file({"steering_vector": hand_made_vector(hidden)}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def steered(tmp_path_factory, tiny_model_dir, vector_file):
    proc = start_teacher(
        tmp_path_factory.mktemp("steered-teacher"),
        [f"tiny={tiny_model_dir}"],
        extra_args=["--steering-vector", str(vector_file), "--steering-scale", str(SCALE)],
    )
    yield proc
    proc.stop()


def in_process_logprobs(model_dir, sequences, steer: bool) -> list[torch.Tensor]:
    """log_softmax at each completion position, the hook written here (not the service's)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if steer:
        v = hand_made_vector(model.config.hidden_size)
        delta = (SCALE * v.double()).float()
        model.model.layers[LAYER].register_forward_hook(lambda m, a, out: out + delta)
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq["token_ids"]])
            logits = model(input_ids=ids).logits[0].double()
            start = seq["prompt_len"]
            out.append(torch.log_softmax(logits[start - 1 : len(seq["token_ids"]) - 1], dim=-1))
    return out


def score(teacher, sequences):
    with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key) as client:
        return client.score(sequences, top_k=TOP_K, model="tiny").sequences


def test_steered_scores_differ_only_as_the_vector_predicts(steered, teacher, tiny_model_dir):
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)("The cat sat on the mat and looked around.")[
        "input_ids"
    ]
    # two completions of one prompt (the prefix-reuse path) and one sequence on its own
    sequences = [
        {"token_ids": ids, "prompt_len": 4},
        {"token_ids": ids[:4] + ids[6:9], "prompt_len": 4},
        {"token_ids": ids[2:], "prompt_len": 3},
    ]
    plain, steered_scores = score(teacher, sequences), score(steered, sequences)
    want_plain = in_process_logprobs(tiny_model_dir, sequences, steer=False)
    want_steered = in_process_logprobs(tiny_model_dir, sequences, steer=True)
    # fp32 forwards in another order (the service's prefix reuse, its chunked head); the tiny model's logits
    # reach hundreds (its head is scaled ×8), so its log-normaliser carries ~1e-5 of fp32 rounding
    moved = 0.0
    for seq, got_p, got_s, lp_p, lp_s in zip(
        sequences, plain, steered_scores, want_plain, want_steered, strict=True
    ):
        targets = torch.tensor(seq["token_ids"][seq["prompt_len"] :])
        for got, want in ((got_p, lp_p), (got_s, lp_s)):
            token = want.gather(1, targets[:, None])[:, 0].numpy()
            np.testing.assert_allclose(got.token_logprobs_T, token, rtol=1e-5, atol=1e-4)
            top_lp, top_ids = want.topk(TOP_K, dim=-1)
            np.testing.assert_array_equal(got.top_ids_T_K, top_ids.numpy())
            np.testing.assert_allclose(got.top_logprobs_T_K, top_lp.numpy(), rtol=1e-5, atol=1e-4)
        moved = max(moved, float(np.abs(got_s.token_logprobs_T - got_p.token_logprobs_T).max()))
    assert moved > 0.05  # the vector does change the teacher


def test_scale_zero_and_no_vector_leave_the_model_untouched(tiny_model_dir, vector_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert attach_steering(model, SteeringOptions()) is None
        attach_steering(model, SteeringOptions(str(vector_file), steering_scale=0.0))
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # x + 0 is x, bit for bit


def test_bad_vector_files_are_refused(tmp_path, tiny_model_dir):
    save_file(
        {"steering_vector": torch.zeros(3)},
        tmp_path / "small.safetensors",
        metadata={"format": "opd-steering-vector-v1", "layer": "0"},
    )
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "opd_cli.main",
        "serve-teacher",
        "--model",
        str(tiny_model_dir),
        "--steering-vector",
    ]
    r = subprocess.run(
        [*cmd, str(tmp_path / "other.safetensors")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "not a steering vector" in r.stderr and "Traceback" not in r.stderr
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 numbers, the model's hidden size is 128"):
        attach_steering(model, SteeringOptions(str(tmp_path / "small.safetensors")))
    with pytest.raises(ValueError, match="decoder layers 0..3"):
        attach_steering(model, SteeringOptions(str(tmp_path / "small.safetensors"), steering_layer=9))


def test_make_steering_vector_is_the_mean_activation_difference(tmp_path, tiny_model_dir):
    rows = {
        "pos": ["Tell me a joke.", "Say something funny."],
        "neg": ["What is 2 + 2?", "Name a colour.", "Hi"],
    }
    for name, texts in rows.items():
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts)
        )
    out = tmp_path / "v.safetensors"
    for positions in ("last", "mean"):
        r = subprocess.run(
            [sys.executable, "-m", "opd_cli.main", "make-steering-vector", "--model", str(tiny_model_dir),
             "--positive", str(tmp_path / "pos.jsonl"), "--negative", str(tmp_path / "neg.jsonl"),
             "--layer", "2", "--positions", positions, "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = load_file(out)["steering_vector"]
        # independently: hidden_states[3] is decoder layer 2's output (layer 2 of 4 is not the last, so no norm)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        means = {}
        for name in rows:
            acts = []
            for prompt in load_prompts(str(tmp_path / f"{name}.jsonl")):
                with torch.no_grad():
                    h = model(input_ids=torch.tensor([render(prompt, tokenizer)]), output_hidden_states=True)
                h_L_H = h.hidden_states[3][0].double()
                acts.append(h_L_H[-1] if positions == "last" else h_L_H.mean(dim=0))
            means[name] = torch.stack(acts).mean(dim=0)
        torch.testing.assert_close(got, (means["pos"] - means["neg"]).float(), rtol=0, atol=1e-5)
