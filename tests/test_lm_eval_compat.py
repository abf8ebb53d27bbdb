"""lm-eval-harness' `local-completions` model against the teacher service equals lm-eval's own `hf` model on
the same weights (the default teacher's HF directory), request by request.

What local-completions sends for loglikelihood requests (lm_eval 0.4.13, models/openai_completions.py and
api_models.py): POST {base_url} (the full .../v1/completions URL) with {"model", "prompt": [[ids], ...] (up
to batch_size token lists: context + continuation, tokenized client-side by the `tokenizer` given),
"temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true} and `Authorization: Bearer
$OPENAI_API_KEY`. From each choice (sorted by `index`) it sums `logprobs.token_logprobs[ctxlen:-1]` (the
-1 drops the one sampled token) and calls it greedy when every such logprob equals
max(`top_logprobs[t]`.values()). Generation requests (generate_until) send {"prompt": [[ids]], "model",
"max_tokens", "temperature": 0, "stop": [...], "seed": 1234} and read `choices[i].text`.

No network: the tokenizer and the `hf` model load from the local directory, the task is a local jsonl, and
the CLI run gets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE plus a dead proxy for anything but loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import free_port

pytest.importorskip("lm_eval")

DEFAULT = "smollm2-135m-instruct"
# fp32 on CPU both sides, but a different batch layout (lm-eval's `hf` pads its batches): measured max
# |difference| 4.3e-6 per request
TOL = 1e-4
PAIRS = [
    ("The capital of France is", " Paris"),  # the teacher's greedy continuation
    ("The capital of France is", " a big city with many people"),
    ("", "Hello world"),  # empty context: lm-eval puts the BOS id (1) in front
    ("Question: 2 + 2 =\nAnswer:", " 4"),
    ("Once upon a time,", " there was a little girl who lived in a village near the forest."),
]
CAPITALS = [
    {"country": "France", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"country": "Italy", "choices": ["Paris", "Rome", "Madrid"], "answer": 1},
    {"country": "Germany", "choices": ["Vienna", "Berlin", "Madrid"], "answer": 1},
    {"country": "Spain", "choices": ["Lisbon", "Berlin", "Madrid"], "answer": 2},
]
# lm-eval joins context and choice with target_delimiter " ", so the choices carry no leading space
TASK_YAML = """\
task: opd_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def model_dir() -> str:
    from opd_common.embedded import embedded_teacher_dir

    return str(embedded_teacher_dir())


@pytest.fixture(scope="module")
def hf_lm(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=4)


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize(
    "batch_size, num_concurrent",
    [(1, 1), (3, 1), (1, 3)],  # one prompt per request; a list of 3 prompts; 3 requests in flight (aiohttp)
)
def test_local_completions_loglikelihoods_equal_hf(
    teacher, model_dir, hf_lm, monkeypatch, batch_size, num_concurrent
):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", teacher.api_key)  # sent as Authorization: Bearer
    api = LocalCompletionsAPI(
        base_url=f"{teacher.http_url}/v1/completions",
        model=DEFAULT,
        tokenizer=model_dir,
        tokenizer_backend="huggingface",
        batch_size=batch_size,
        num_concurrent=num_concurrent,
        max_retries=1,
    )
    got = api.loglikelihood(instances(PAIRS), disable_tqdm=True)
    want = hf_lm.loglikelihood(instances(PAIRS), disable_tqdm=True)
    assert len(got) == len(want) == len(PAIRS)
    for (lp, greedy), (hf_lp, hf_greedy), pair in zip(got, want, PAIRS, strict=True):
        assert abs(lp - hf_lp) <= TOL, (pair, lp, hf_lp)
        assert greedy == hf_greedy, pair
    assert [g for _, g in got] == [True, False, False, False, False]  # both greedy outcomes occur


def test_local_completions_rolling_loglikelihood_equals_hf(teacher, model_dir, hf_lm, monkeypatch):
    """Perplexity tasks (wikitext-style): windows scored after the BOS token."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", teacher.api_key)
    api = LocalCompletionsAPI(
        base_url=f"{teacher.http_url}/v1/completions",
        model=DEFAULT,
        tokenizer=model_dir,
        tokenizer_backend="huggingface",
        max_retries=1,
    )
    text = "The quick brown fox jumps over the lazy dog. " * 3
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    (got,) = api.loglikelihood_rolling(reqs, disable_tqdm=True)
    (want,) = hf_lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert abs(got - want) <= TOL, (got, want)


def test_local_completions_greedy_generation_equals_hf(teacher, model_dir, hf_lm, monkeypatch):
    """Generative tasks (gsm8k-style): {"prompt": [ids], "max_tokens", "temperature": 0, "stop", "seed"};
    the service's greedy KV-cache decode and `stop` handling give the `hf` model's strings."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", teacher.api_key)
    api = LocalCompletionsAPI(
        base_url=f"{teacher.http_url}/v1/completions",
        model=DEFAULT,
        tokenizer=model_dir,
        tokenizer_backend="huggingface",
        max_retries=1,
    )
    contexts = ["Q: What is the capital of France?\nA:", "The three primary colours are", "def add(a, b):\n"]
    gen_kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}

    def reqs():  # lm-eval pops from the kwargs dict, so each model gets fresh ones
        return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]

    got = api.generate_until(reqs(), disable_tqdm=True)
    want = hf_lm.generate_until(reqs(), disable_tqdm=True)
    assert got == want
    # without the stop string the first one goes on with "\nB: The capital of France is Paris."
    assert want[0] == " The capital of France is Paris." and all(want)


def test_lm_eval_cli_on_a_local_task_equals_hf(teacher, model_dir, hf_lm, tmp_path):
    """The docs/integrations.md command: `lm_eval --model local-completions ...` on a local multiple-choice
    task; every per-choice loglikelihood it logs equals the `hf` model's, and so does the accuracy."""
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in CAPITALS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "opd_capitals.yaml").write_text(TASK_YAML.format(data=data))
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens: any non-loopback request fails
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HTTP_PROXY": dead_proxy,
        "HTTPS_PROXY": dead_proxy,
        "NO_PROXY": "127.0.0.1,localhost",
        "OPENAI_API_KEY": teacher.api_key,
    }
    model_args = (
        f"base_url={teacher.http_url}/v1/completions,model={DEFAULT},tokenizer={model_dir},"
        "tokenizer_backend=huggingface"
    )
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args]
    cmd += ["--include_path", str(tasks), "--tasks", "opd_capitals"]
    cmd += ["--output_path", str(tmp_path / "out"), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, textwrap.shorten(run.stderr[-4000:], 4000)

    (samples_file,) = (tmp_path / "out").rglob("samples_opd_capitals_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.open()), key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == CAPITALS
    accs = []
    for s in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        assert [p[1] for p in pairs] == [" " + c for c in s["doc"]["choices"]]
        got = [float(r[0][0]) for r in s["resps"]]
        want = [lp for lp, _ in hf_lm.loglikelihood(instances(pairs), disable_tqdm=True)]
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
        assert s["acc"] == float(np.argmax(want) == s["doc"]["answer"])
        accs.append(s["acc"])
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]["opd_capitals"]
    assert results["acc,none"] == pytest.approx(np.mean(accs))
