"""A teacher fleet: graceful drain on SIGTERM under load, and clients failing over between replicas.

Real `opd serve-teacher` processes on loopback; replicas run `--batch-invariant`, so a sequence scores the
same bits on any replica in any batch and "identical results" can be asserted exactly.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from helpers import assert_same_scores, start_teacher
from opd_client.endpoints import Endpoints, grpc_target, split_urls
from opd_client.grpc_client import GrpcTeacherClient
from opd_client.http_client import AsyncHttpTeacherClient, HttpTeacherClient

DEFAULT = "smollm2-135m-instruct"


def sequences(n: int, length: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"token_ids": rng.integers(3, 49000, length).tolist(), "prompt_len": 8} for _ in range(n)]


# ---- drain --------------------------------------------------------------------------------------------


def test_sigterm_under_load_finishes_every_request_in_flight(tmp_path):
    # 400-token batches: two sequences per forward, so most requests wait in the queue at SIGTERM.
    flags = ["--batch-invariant", "--drain-timeout", "60", "--max-batch-tokens", "400"]
    teacher = start_teacher(tmp_path, [DEFAULT], extra_args=flags)
    try:
        seqs = sequences(12, 192, seed=0)
        with HttpTeacherClient(teacher.http_url, api_key=teacher.api_key) as client:
            alone = [client.score([s], 5) for s in seqs]

        async def load():
            async with AsyncHttpTeacherClient(
                teacher.http_url, api_key=teacher.api_key, timeout=120
            ) as client:
                return await asyncio.gather(*(client.score([s], 5) for s in seqs[:8]))

        grpc_results: list = []

        def grpc_load():
            client = GrpcTeacherClient(teacher.grpc_target, api_key=teacher.api_key, timeout=120)
            with client, ThreadPoolExecutor(4) as pool:
                grpc_results.extend(pool.map(lambda s: client.score([s], 5), seqs[8:]))

        grpc_thread = threading.Thread(target=grpc_load)
        grpc_thread.start()
        http_results: list = []
        http_thread = threading.Thread(target=lambda: http_results.extend(asyncio.run(load())))
        http_thread.start()
        _wait_for_queue(teacher, at_least=6)  # most requests are waiting behind a running forward

        teacher.process.send_signal(signal.SIGTERM)
        ready_during_drain = _poll_ready_until_exit(teacher)
        http_thread.join(120)
        grpc_thread.join(120)
        assert teacher.process.wait(120) == 0, teacher.log()[-2000:]
    finally:
        teacher.stop()

    assert len(http_results) == 8 and len(grpc_results) == 4  # nothing in flight was lost
    for want, got in zip(alone, http_results + grpc_results, strict=True):
        assert_same_scores(want, got, atol=0.0)
    assert ready_during_drain and set(ready_during_drain) <= {503, None}, ready_during_drain
    assert 503 in ready_during_drain  # it said not-ready while it finished the work
    assert "draining" in teacher.log()


def _wait_for_queue(teacher, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(
            f"{teacher.http_url}/metrics", headers={"Authorization": f"Bearer {teacher.api_key}"}
        ).text
        waiting = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("opd_queue_requests{")
        )
        if waiting >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} requests ever waited in the queue")


def _poll_ready_until_exit(teacher) -> list[int | None]:
    """/health/ready answers from SIGTERM until the process exits (None: connection refused)."""
    codes: list[int | None] = []
    while teacher.process.poll() is None and len(codes) < 2000:
        try:
            codes.append(httpx.get(f"{teacher.http_url}/health/ready", timeout=2).status_code)
        except httpx.TransportError:
            codes.append(None)
        time.sleep(0.05)
    return codes


# ---- failover -----------------------------------------------------------------------------------------


@pytest.fixture
def two_replicas(tmp_path, tiny_model_dir):
    replicas = [
        start_teacher(tmp_path / name, [f"tiny={tiny_model_dir}"], extra_args=["--batch-invariant"])
        for name in ("a", "b")
    ]
    yield replicas
    for replica in replicas:
        replica.stop()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_replica_killed_mid_run_does_not_change_the_results(two_replicas, transport):
    a, b = two_replicas
    seqs = sequences(60, 48, seed=1)
    with HttpTeacherClient(a.http_url, api_key=a.api_key) as single:
        want = [single.score([s], 8) for s in seqs]

    if transport == "http":
        client = HttpTeacherClient([a.http_url, b.http_url], api_key=a.api_key, timeout=30)
    else:
        client = GrpcTeacherClient([a.grpc_target, b.grpc_target], api_key=a.api_key, timeout=30)
    done = []

    def score(i: int):
        result = client.score([seqs[i]], 8)
        done.append(i)
        if len(done) == 15:
            b.process.kill()  # a replica dies with requests in flight on it
        return result

    with client, ThreadPoolExecutor(4) as pool:
        got = list(pool.map(score, range(len(seqs))))
    assert b.process.wait(10) != 0  # it really died mid-run
    for w, g in zip(want, got, strict=True):
        assert_same_scores(w, g, atol=0.0)


def test_http_requests_go_round_robin_over_replicas(two_replicas):
    a, b = two_replicas
    before = [_score_requests(r) for r in (a, b)]
    with HttpTeacherClient(f"{a.http_url},{b.http_url}", api_key=a.api_key) as client:
        for s in sequences(10, 16, seed=2):
            client.score([s], 4)
    after = [_score_requests(r) for r in (a, b)]
    assert [y - x for x, y in zip(before, after, strict=True)] == [5, 5]


def _score_requests(teacher) -> float:
    text = httpx.get(
        f"{teacher.http_url}/metrics", headers={"Authorization": f"Bearer {teacher.api_key}"}
    ).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("opd_requests_total{") and 'endpoint="/v1/score"' in line and 'code="200"' in line
    )


# ---- endpoint lists -----------------------------------------------------------------------------------


def test_url_lists_and_bad_urls():
    assert split_urls("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="must look like http://HOST:PORT"):
        split_urls("a:1")
    with pytest.raises(ValueError, match="no teacher URL"):
        split_urls(" , ")


def test_a_replica_that_failed_sits_out_its_cooldown():
    endpoints = Endpoints(["http://127.0.0.1:1", "http://127.0.0.1:2"], cooldown_s=0.3)
    assert [endpoints.pick() for _ in range(4)] == ["http://127.0.0.1:1", "http://127.0.0.1:2"] * 2
    endpoints.mark_down("http://127.0.0.1:1")
    assert {endpoints.pick() for _ in range(3)} == {"http://127.0.0.1:2"}
    assert not endpoints.any_available(besides="http://127.0.0.1:2")
    time.sleep(0.35)
    assert "http://127.0.0.1:1" in {endpoints.pick() for _ in range(2)}


def test_localhost_stays_one_replica_and_grpc_lists_use_round_robin():
    assert Endpoints("http://localhost:8000").replicas() == ["http://localhost:8000"]
    target, options = grpc_target("127.0.0.1:1,127.0.0.1:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2" and ("grpc.lb_policy_name", "round_robin") in options
    assert grpc_target("teacher-headless.ns.svc:50051")[0] == "dns:///teacher-headless.ns.svc:50051"
