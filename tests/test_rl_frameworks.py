"""slime, verl and prime-rl against a real opd teacher, each as its own source asks and reads (docs/integrations.md).

None of the three installs here without a GPU stack (slime: Megatron and SGLang from git; verl 0.9.1's pip
install would replace this venv's transformers; prime-rl: vLLM 0.26.0 CUDA wheels), so each test replays the
exact request the framework's source builds, quoted below with the commit read, and parses the answer the
way that source does; prime-rl's request goes through the real `openai` SDK call it makes. The numbers are
checked against /v1/score on the same tokens to TOL = 1e-5.

- slime THUDM/slime@624b824a898ab0ec1fcb4d373004c7f3852bf515, slime/rollout/on_policy_distillation.py
- verl 0.9.1 (PyPI wheel), verl/experimental/teacher_loop/teacher_manager.py and
  verl/workers/rollout/sglang_rollout/async_sglang_server.py
- prime-rl PrimeIntellect-ai/prime-rl@559b44772e471d1538537b8805cc77f3824a5e64, src/prime_rl/utils/client.py
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import httpx
import numpy as np
import openai
import pytest

from helpers import start_teacher
from opd_client.convert import score_result_from_json

TOL = 1e-5
PROMPT = [1, 504, 3575, 282, 4649, 314]
RESPONSE = [7042, 30, 504, 3575, 2]


@pytest.fixture(scope="module")
def open_teacher(tmp_path_factory, tiny_model_dir):
    """A teacher without --api-key-file (slime's reward_func sends no key), two models by name."""
    proc = start_teacher(
        tmp_path_factory.mktemp("rl-teacher"),
        [f"tiny={tiny_model_dir}", f"other={tiny_model_dir}"],
        api_key=None,
    )
    yield proc
    proc.stop()


def v1_score(url: str, token_ids: list[int], prompt_len: int, top_k: int, model: str = "tiny"):
    body = {"model": model, "sequences": [{"token_ids": token_ids, "prompt_len": prompt_len}], "top_k": top_k}
    r = httpx.post(f"{url}/v1/score", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return score_result_from_json(r.json()).sequences[0]


# ---- slime ----------------------------------------------------------------------------------------------


async def slime_reward_func(rm_url: str, tokens: list[int], rollout_temperature: float) -> dict:
    # slime/rollout/on_policy_distillation.py@624b824, reward_func (args.rm_url, sample.tokens, no images):
    #     payload = {"input_ids": sample.tokens,
    #                "sampling_params": {"temperature": args.rollout_temperature, "max_new_tokens": 0,
    #                                    "skip_special_tokens": False},
    #                "return_logprob": True, "logprob_start_len": 0}
    #     async with aiohttp.ClientSession(**session_kwargs) as session:
    #         async with session.post(args.rm_url, json=payload) as resp:
    #             resp.raise_for_status()
    #             return await resp.json()
    payload = {
        "input_ids": tokens,
        "sampling_params": {
            "temperature": rollout_temperature,
            "max_new_tokens": 0,
            "skip_special_tokens": False,
        },
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    async with aiohttp.ClientSession() as session:  # noqa: SIM117 (as slime writes it)
        async with session.post(rm_url, json=payload) as resp:
            resp.raise_for_status()
            return await resp.json()


def slime_teacher_log_probs(reward: dict, response_length: int) -> list[float]:
    # post_process_rewards@624b824:
    #     torch.tensor([item[0] for item in reward["meta_info"]["input_token_logprobs"][1:]])
    #     t_log_prob[-response_length:]
    return [item[0] for item in reward["meta_info"]["input_token_logprobs"][1:]][-response_length:]


@pytest.mark.parametrize("model", [None, "other"])
def test_slime_on_policy_distillation_reads_the_teachers_response_logprobs(open_teacher, model):
    rm_url = f"{open_teacher.http_url}/generate" + (f"?model={model}" if model else "")  # --rm-url
    reward = asyncio.run(slime_reward_func(rm_url, PROMPT + RESPONSE, rollout_temperature=0.8))
    got = np.array(slime_teacher_log_probs(reward, len(RESPONSE)))
    # the rollout temperature does not change input logprobs (SGLang computes them at temperature 1)
    want = v1_score(open_teacher.http_url, PROMPT + RESPONSE, len(PROMPT), 1, model=model or "tiny")
    assert got.shape == (len(RESPONSE),) and np.max(np.abs(got - want.token_logprobs_T)) <= TOL


# ---- verl -----------------------------------------------------------------------------------------------


def verl_teacher_request(sequence_ids: list[int], topk: int) -> dict:
    # verl 0.9.1 teacher_manager._get_teacher_sampling_params: {"max_tokens": 1, "temperature": 1.0,
    # "prompt_logprobs": topk (0 without use_topk), "detokenize": False}; async_sglang_server
    # SGLangHttpServer.generate turns it into (max_tokens -> max_new_tokens, prompt_logprobs popped):
    #     request = {"rid": request_id, "input_ids": prompt_ids, "sampling_params": sampling_params,
    #                "return_logprob": return_logprob, "image_data": image_data, "video_data": video_data}
    #     if prompt_logprobs is not None:
    #         request["logprob_start_len"] = 0
    #         if prompt_logprobs > 0: request["top_logprobs_num"] = prompt_logprobs
    request = {
        "rid": uuid.uuid4().hex,
        "input_ids": sequence_ids,
        "sampling_params": {"temperature": 1.0, "detokenize": False, "max_new_tokens": 1},
        "return_logprob": True,
        "image_data": None,
        "video_data": None,
        "logprob_start_len": 0,
    }
    if topk > 0:
        request["top_logprobs_num"] = topk
    return request


def verl_extract_prompt_logprobs(meta_info: dict, k: int, sequence_length: int) -> tuple[list, list]:
    # verl 0.9.1 async_sglang_server._extract_prompt_logprobs_sglang, as written there
    input_token_logprobs = meta_info.get("input_token_logprobs") or []
    input_top_logprobs = meta_info.get("input_top_logprobs") or [] if k > 0 else []
    ids_ls, lps_ls = [], []
    for position in range(1, len(input_token_logprobs)):
        if k == 0:
            logprob, token_id, _ = input_token_logprobs[position]
            ids_ls.append([int(token_id)])
            lps_ls.append([float(logprob)])
        else:
            top_entries = input_top_logprobs[position]
            ids = [int(tok_id) for _, tok_id, _ in top_entries]
            assert len(ids) == k
            ids_ls.append(ids)
            lps_ls.append([float(logprob) for logprob, _, _ in top_entries])
    ids_ls.append([0] * max(k, 1))
    lps_ls.append([0.0] * max(k, 1))
    assert len(ids_ls) == sequence_length
    return ids_ls, lps_ls


@pytest.mark.parametrize("topk", [0, 8])
def test_verl_sglang_teacher_request_and_extraction(open_teacher, topk):
    sequence = PROMPT + RESPONSE
    r = httpx.post(
        f"{open_teacher.http_url}/generate", json=verl_teacher_request(sequence, topk), timeout=120
    )
    assert r.status_code == 200, r.text
    output = r.json()
    # verl also checks len(output_token_logprobs) == len(output_ids) for the one generated token
    assert len(output["output_ids"]) == 1 == len(output["meta_info"]["output_token_logprobs"])
    ids, lps = verl_extract_prompt_logprobs(output["meta_info"], topk, len(sequence))
    want = v1_score(open_teacher.http_url, sequence, 1, max(topk, 1))
    ids_T_K, lps_T_K = np.array(ids[:-1]), np.array(lps[:-1])
    if topk == 0:
        assert ids_T_K[:, 0].tolist() == sequence[1:]
        assert np.max(np.abs(lps_T_K[:, 0] - want.token_logprobs_T)) <= TOL
    else:
        np.testing.assert_array_equal(ids_T_K, want.top_ids_T_K)
        assert np.max(np.abs(lps_T_K - want.top_logprobs_T_K)) <= TOL


# ---- prime-rl -------------------------------------------------------------------------------------------


async def prime_rl_prefill_logprobs(
    client: openai.AsyncOpenAI, model: str, token_ids: list[int]
) -> list[float]:
    # src/prime_rl/utils/client.py@559b447, prefill_logprobs, as written there except that the answer is
    # read as JSON (vLLM's GenerateResponse.model_validate_json is not installed here; the loop below takes
    # either its Logprob objects or dicts, as the source's `hasattr(first, "logprob")` does)
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    http_response = await client.post(
        f"{base}/inference/v1/generate",
        cast_to=httpx.Response,
        body={
            "model": model,
            "token_ids": token_ids,
            "sampling_params": {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "prompt_logprobs": 1},
        },
    )
    response = http_response.json()
    flat: list[float] = []
    for entry in response["prompt_logprobs"] or []:
        if not entry:
            flat.append(0.0)
            continue
        first = next(iter(entry.values()))
        lp = first.logprob if hasattr(first, "logprob") else first.get("logprob")
        flat.append(float(lp) if lp is not None else 0.0)
    return flat


async def prime_rl_connect(base_url: str, name: str) -> None:
    # connect_frozen_pool -> InferencePool.wait_for_ready: GET /health on the admin client (base_url without
    # /v1) until 200, then maybe_check_has_model: GET /v1/models, some data[i]["id"] == the teacher's name
    async with httpx.AsyncClient(base_url=base_url.rstrip("/").removesuffix("/v1")) as admin:
        (await admin.get("/health")).raise_for_status()
        models = (await admin.get("/v1/models")).json()["data"]
        assert any(model["id"] == name for model in models), f"Model {name} was not found"


@pytest.mark.parametrize("name", ["tiny", "other"])
def test_prime_rl_opd_teacher_scores_through_inference_v1_generate(open_teacher, name):
    base_url = f"{open_teacher.http_url}/v1"  # [orchestrator.algo.teacher] base_url

    async def run() -> list[float]:
        await prime_rl_connect(base_url, name)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY") as client:
            return await prime_rl_prefill_logprobs(client, name, PROMPT + RESPONSE)

    got = np.array(asyncio.run(run()))
    want = v1_score(open_teacher.http_url, PROMPT + RESPONSE, 1, 1, model=name)
    assert got.shape == (len(PROMPT + RESPONSE),) and got[0] == 0.0  # the leading token has no context
    assert np.max(np.abs(got[1:] - want.token_logprobs_T)) <= TOL


def test_inference_v1_generate_errors_name_the_field(open_teacher):
    url = f"{open_teacher.http_url}/inference/v1/generate"
    cases = [
        ({"token_ids": [1, 49152], "sampling_params": {}}, "token_ids[1]"),
        (
            {"token_ids": [1, 2], "sampling_params": {"prompt_logprobs": 10**7}},
            "sampling_params.prompt_logprobs",
        ),
        ({"token_ids": [1, 2], "sampling_params": {"top_p": 2.0}}, "sampling_params.top_p"),
        ({"token_ids": [1, 2], "sampling_params": {"logprobs": 1}}, "sampling_params.logprobs"),
        ({"token_ids": [1, 2], "sampling_params": {"best_of": 2}}, "sampling_params.best_of"),
    ]
    for body, field in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == field, (field, r.text)
    ok = httpx.post(
        url, json={"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 0, "prompt_logprobs": 2}}
    )
    assert ok.status_code == 200 and len(ok.json()["prompt_logprobs"]) == 3
