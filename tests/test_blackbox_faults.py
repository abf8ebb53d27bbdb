"""A misbehaving teacher API: 5xx, 429 + Retry-After, answers slower than the timeout, bodies that are not
JSON or lack fields. Each is retried or ends in a clear error, at the API client, at /v1/chunk-score, and
`opd train --loss chunk` loses no step. The faults come from a loopback proxy in front of the real
llama-cpp-python server (tests/blackbox_helpers.py); every answer that is not a fault is the real one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest
from blackbox_helpers import API_MODEL, FaultProxy, start_llama_server

from helpers import make_tiny_model, start_teacher
from opd_client import HttpTeacherClient
from opd_client.errors import Overloaded, Unavailable, UpstreamError
from opd_student.metrics_log import read_metrics
from opd_teacher.blackbox.api_client import ApiLimits, ApiUsage, OpenAIChatAPI

HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    llama = start_llama_server(tmp_path_factory.mktemp("llama"))
    fault_proxy = FaultProxy(llama.base_url).start()
    yield fault_proxy
    fault_proxy.stop()
    llama.stop()


@pytest.fixture(autouse=True)
def _disarmed(request):
    """Each test starts and leaves the proxy passing everything through."""
    proxy = request.getfixturevalue("proxy") if "proxy" in request.fixturenames else None
    if proxy is not None:
        proxy.arm()
    yield
    if proxy is not None:
        proxy.arm()


def complete(proxy: FaultProxy, timeout: float = 20.0, attempts: int = 4, max_backoff: float = 5.0):
    """(choices, usage, seconds) of one short completion through the proxy, or the exception it raised."""
    limits = ApiLimits(
        timeout_s=timeout, max_attempts=attempts, initial_backoff_s=0.2, max_backoff_s=max_backoff, jitter=0
    )

    async def run():
        api = OpenAIChatAPI(proxy.base_url, API_MODEL, None, limits)
        usage = ApiUsage()
        started = time.monotonic()
        try:
            return await api.complete({"messages": HI}, 1, 3, 0.0, usage), usage, time.monotonic() - started
        finally:
            await api.aclose()

    return asyncio.run(run())


def test_server_errors_are_retried_until_the_real_answer(proxy):
    proxy.arm(queue=["500", "500"])
    choices, usage, _ = complete(proxy)
    assert choices[0].text and usage.retries == 2 and usage.requests == 1
    assert [f for _, f in proxy.calls] == ["500", "500", "ok"]


def test_429_waits_at_least_retry_after(proxy):
    proxy.arm(queue=["429:1"])
    choices, usage, _ = complete(proxy)
    (t429, _), (t_ok, _) = proxy.calls
    assert choices[0].text and usage.retries == 1 and t_ok - t429 >= 1.0


def test_429_longer_than_the_budget_is_passed_on_not_slept_through(proxy):
    proxy.arm(queue=["429:30"])
    with pytest.raises(Overloaded, match="HTTP 429") as e:
        complete(proxy, max_backoff=2.0)
    assert e.value.retry_after == 30 and len(proxy.calls) == 1


def test_answers_slower_than_the_timeout_are_retried_then_a_clear_error(proxy):
    proxy.arm(queue=["slow:60"])  # the proxy stops waiting when the client hangs up
    choices, usage, _ = complete(proxy, timeout=6.0)
    assert choices[0].text and usage.retries == 1
    proxy.arm(phases=[("slow:60", 60)])
    with pytest.raises(Unavailable, match="did not answer in time.*2 attempts"):
        complete(proxy, timeout=1.0, attempts=2)


@pytest.mark.parametrize(
    "fault,message",
    [
        ("badjson", "body is not JSON: '<html>upstream hiccup</html>'"),
        ("nochoices", "no 'choices' list"),
        ("nocontent", r"choices\[0\].message.content is null, not a string"),
    ],
)
def test_unreadable_answers_are_retried_then_a_clear_error(proxy, fault, message):
    proxy.arm(queue=[fault])
    choices, usage, _ = complete(proxy)
    assert choices[0].text and usage.retries == 1
    proxy.arm(phases=[(fault, 60)])
    with pytest.raises(UpstreamError, match=message) as e:
        complete(proxy, attempts=2)
    assert e.value.http_status == 502 and proxy.base_url in e.value.message


def test_a_refused_key_is_not_retried(proxy):
    proxy.arm(queue=["401", "401"])
    with pytest.raises(UpstreamError, match="refused our key"):
        complete(proxy)
    assert len(proxy.calls) == 1


# ---- through the service and the trainer --------------------------------------------------------------


@pytest.fixture(scope="module")
def blackbox(proxy, tmp_path_factory):
    """The black-box teacher service talking to the API through the fault proxy, with a small retry budget
    so that faults reach its callers."""
    proxy.arm()  # module fixtures start before the per-test disarming
    teacher = start_teacher(
        tmp_path_factory.mktemp("blackbox"),
        models=[],
        extra_args=[
            "--backend", "openai", "--api-base", proxy.base_url, "--api-model", API_MODEL,
            "--api-max-attempts", "2", "--api-timeout", "10", "--api-max-backoff", "2",
        ],
    )  # fmt: skip
    yield teacher
    teacher.stop()


def test_a_chat_only_api_gets_instruct_with_a_warning(blackbox):
    """The proxy serves only chat/completions (a chat-only API): auto falls back to instruct and says why."""
    with HttpTeacherClient(blackbox.http_url, api_key=blackbox.api_key) as client:
        (info,) = client.models()
    assert info.source.endswith("prefill instruct"), info.source
    log = blackbox.log()
    assert (
        "--api-prefill auto: instruct, the last resort" in log and "/v1/completions answered HTTP 404" in log
    )


def test_chunk_score_maps_api_faults_to_statuses_with_retry_after(blackbox, proxy):
    body = {"messages": HI, "completion": ["Hi", " there", "!"], "num_chunks": 1, "num_samples": 1}
    headers = {"Authorization": f"Bearer {blackbox.api_key}"}

    def post() -> httpx.Response:
        return httpx.post(f"{blackbox.http_url}/v1/chunk-score", json=body, headers=headers, timeout=60)

    proxy.arm(phases=[("500", 60)])
    r = post()
    assert r.status_code == 503 and "HTTP 500" in r.json()["error"]["message"] and r.headers["Retry-After"]
    proxy.arm(queue=["429:30"])
    r = post()
    assert r.status_code == 429 and r.headers["Retry-After"] == "30"
    proxy.arm(phases=[("badjson", 60)])
    r = post()
    assert r.status_code == 502 and "not JSON" in r.json()["error"]["message"]
    calls = len(proxy.calls)
    time.sleep(1.5)  # a failed request cancels its other calls: none keeps retrying in the background
    assert len(proxy.calls) == calls
    proxy.arm(queue=["500"])  # within the service's budget: retried, answered
    r = post()
    # >= 1: on a loaded machine a real answer can also outlast --api-timeout and be retried
    assert r.status_code == 200 and r.json()["usage"]["retries"] >= 1, r.text


@pytest.mark.slow
def test_train_loses_no_step_while_the_api_misbehaves(blackbox, proxy, tmp_path):
    student = make_tiny_model(tmp_path / "student", layers=2, seed=1)
    out = tmp_path / "run"
    # Four of each fault for the next 16 API calls, in this order: the first requests' calls and their
    # retries (the service tries twice) all fail, so the trainer sees 503/502/429 and waits. By count, not by
    # time windows: the trainer's doubling backoff once stepped over a 2 s window of 429s.
    proxy.arm(queue=["500"] * 4 + ["badjson"] * 4 + ["429:1"] * 4 + ["slow:60"] * 4)
    cmd = [
        sys.executable, "-m", "opd_cli.main", "train", "--teacher-url", blackbox.http_url,
        "--student", str(student), "--out", str(out), "--loss", "chunk", "--steps", "3",
        "--prompts-per-step", "2", "--samples-per-prompt", "1", "--max-new-tokens", "6",
        "--chunk-num", "1", "--chunk-tokens", "3", "--chunk-samples", "2",
        "--eval-num-prompts", "2", "--eval-max-new-tokens", "6", "--teacher-timeout-s", "30",
    ]  # fmt: skip
    env = {**os.environ, "OPD_TEACHER_API_KEY": blackbox.api_key}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "teacher unreachable" in r.stdout, r.stdout[-3000:]
    served = set(proxy.faults_served())
    assert {"500", "badjson", "429:1", "slow:60"} <= served, served
    records = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in records if not x.get("eval")] == [1, 2, 3]
    assert [x["step"] for x in records if x.get("eval")] == [0, 3]
