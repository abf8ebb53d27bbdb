"""schemathesis over the running service's own OpenAPI document (/openapi.json): every operation, schema-valid
and schema-violating requests, a fixed seed and a bounded number of cases.

Two of schemathesis' phases, through its Python API: coverage (deterministic boundary and just-outside
values of every field, ~1,070 requests here) and fuzzing (CASES_PER_MODE random requests per operation and
mode from hypothesis, seeded). The CLI's other phases are left out: examples (the document declares none) and
stateful (no operation creates something another one reads).

Asserted: no answer is a 5xx, every request is answered within REQUEST_TIMEOUT_S, every operation was called,
and /health/ready is 200 afterwards. Client errors (4xx) are the expected answer to most generated requests.

The service is the real `opd serve-teacher` serving the tiny model with `--max-generation-tokens 32`: the
fuzzer sends hundreds of generation requests, and the limit keeps each one short (the limit itself is one of
the things under test: larger max_tokens must be a 400, not a long decode).
"""

from __future__ import annotations

import collections

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from helpers import start_teacher

SEED = 20240522
CASES_PER_MODE = 10  # per operation, schema-valid and schema-violating: ~110 random requests
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def fuzz_teacher(tmp_path_factory, tiny_model_dir):
    proc = start_teacher(
        tmp_path_factory.mktemp("fuzz-teacher"),
        models=[f"tiny={tiny_model_dir}"],
        extra_args=["--max-generation-tokens", "32"],
    )
    yield proc
    proc.stop()


def _fuzz(operation, mode: GenerationMode, call) -> None:
    @seed(SEED)
    @settings(
        max_examples=CASES_PER_MODE,
        deadline=None,
        database=None,  # no example database: the same cases on every run and machine
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        call(operation.label, case)

    try:
        run()
    except Unsatisfiable:  # no schema-violating request exists: no body, no parameter or only strings
        assert mode is GenerationMode.NEGATIVE, operation.label


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_hang(fuzz_teacher):
    auth = {"Authorization": f"Bearer {fuzz_teacher.api_key}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_teacher.http_url}/openapi.json", headers=auth, timeout=30)
    schema.config.output.sanitization.enabled = False  # failures show the values sent ("max_tokens" too)
    operations = [result.ok() for result in schema.get_all_operations()]
    calls: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    failures: list[str] = []
    session = requests.Session()

    def call(label: str, case) -> None:
        calls[label] += 1
        try:
            response = case.call(session=session, headers=auth, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            failures.append(f"{label}: no answer within {REQUEST_TIMEOUT_S} s\n{case.as_curl_command()}")
            return
        statuses[label, response.status_code] += 1
        if response.status_code >= 500:
            failures.append(
                f"{label}: {response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
            )

    for operation in operations:
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(
            operation, generation_modes=list(MODES), generation_config=generation
        ):
            call(operation.label, case)
        for mode in MODES:
            _fuzz(operation, mode, call)

    assert not failures, "\n\n".join(failures[:10])
    labels = {op.label for op in operations}
    assert {"POST /v1/score", "POST /v1/completions", "POST /v1/chat/completions"} <= labels, labels
    assert set(calls) == labels, calls  # every operation was called
    ready = httpx.get(f"{fuzz_teacher.http_url}/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    print(f"{sum(calls.values())} requests:", dict(sorted(statuses.items())))
