"""The black-box teacher: an OpenAI-compatible API plus the embedding model that compares texts.

It has no logits to give: `/v1/score` and `/v1/tokenize` are refused with a message that points to
`/v1/chunk-score`. How the teacher is made to continue a partial answer depends on what the API allows
(`prefill`, `--api-prefill`):

- "completions": the raw-text `/v1/completions` endpoint, the prompt written by opd in the teacher's chat
  template (opd_teacher.blackbox.chat_template) with the partial answer after the assistant header, so the
  teacher continues the student's exact prefix (vLLM, SGLang, TGI, llama.cpp, llama-cpp-python and many
  hosted open-model APIs have it);
- "assistant": the partial answer is sent as a final assistant message, which the API continues (Anthropic,
  llama.cpp's llama-server, DeepSeek/Mistral with their prefix flags);
- "continue": the same plus vLLM/SGLang's `continue_final_message: true, add_generation_prompt: false`;
- "instruct": any chat API, even one that closes a final assistant turn (OpenAI, llama-cpp-python's chat):
  the user turn shows the start of the answer and asks for the rest; a reply that repeats that start has it
  cut off. The last resort: a small model follows the instruction badly. Its wording was chosen by
  measurement: with SmolLM2-135M-Instruct behind llama-cpp-python, 8-token greedy continuations at 1/4 and
  1/2 of 20 greedy answers matched the true next 8 tokens with embedding cosine 0.50 and edit similarity
  0.41 ("Continue this partial answer ... without repeating it": 0.38 / 0.26; a final assistant message,
  which that server closes: 0.32 / 0.23; ignoring the prefix: 0.36 / 0.28);
- "auto" (the default): "completions" when the API answers a 1-token raw-text request at start-up, else
  "instruct" with a warning (whether a chat API continues a final assistant message cannot be told from
  one answer, so "assistant" and "continue" are only ever chosen by the user). The choice is logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from opd_client.errors import InvalidRequest
from opd_client.schema import ModelInfo
from opd_teacher.blackbox.api_client import PREFILL_MODES, ApiLimits, OpenAIChatAPI
from opd_teacher.blackbox.chat_template import ChatTemplate
from opd_teacher.blackbox.similarity import Embedder

if TYPE_CHECKING:  # only the Backend protocol's signatures: nothing of them runs here
    from opd_client.scores import SequenceScores
    from opd_teacher.backends.base import ScoreItem
    from opd_teacher.backends.generate import Generation, SamplingParams
    from opd_teacher.backends.head import HeadExport

log = logging.getLogger(__name__)
INSTRUCT_TEMPLATE = "{question}\n\nComplete the answer: {prefix}"


class BlackBoxBackend:
    """What the engine holds for `--backend openai`; chunk scoring (opd_teacher.blackbox.chunk_scorer) uses it."""

    bos_token_id: int | None = None  # the Backend protocol's attributes (no tokenizer, no forwards here)
    last_forward_tokens: int = 0
    head: HeadExport | None = None

    def __init__(
        self,
        name: str,
        api_base: str,
        api_model: str,
        api_key: str | None = None,
        limits: ApiLimits | None = None,
        prefill: str = "auto",
        max_request_tokens: int = 4096,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill = {prefill!r} must be one of {PREFILL_MODES}")
        self.template = chat_template or ChatTemplate.load(None)
        # httpx logs every call at INFO: thousands of lines per training run. Failures are logged by the
        # API client itself, with what was wrong.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.limits = limits or ApiLimits()
        self.api = OpenAIChatAPI(api_base, api_model, api_key, self.limits)
        self.prefill = prefill
        self.info = ModelInfo(
            name=name,
            revision="api",
            vocab_size=0,
            tokenizer_sha256="",
            max_top_k=self.limits.max_top_logprobs,
            max_tokens=max_request_tokens,  # student tokens per chunk-score request
            max_sequence_len=max_request_tokens,
            dtype="api",
            device=self.api.api_base,
            source=f"OpenAI-compatible chat API {self.api.api_base}, model {api_model}, prefill {prefill}",
            black_box=True,
        )
        self.embedder: Embedder | None = None

    def warm_up(self) -> None:
        """Check the API answers (a wrong URL, key or model fails at start-up), settle the prefill mode and
        load the embedder."""
        self.api.check()
        self.prefill = self._settle_prefill()
        source = self.info.source.rsplit(", prefill ", 1)[0] + f", prefill {self.prefill}"
        self.info = self.info.model_copy(update={"source": source})
        self.embedder = Embedder()
        self.embedder.encode(["warm up"])

    def _settle_prefill(self) -> str:
        if self.prefill not in ("auto", "completions"):
            return self.prefill
        refused = self.api.probe_completions()
        if self.prefill == "completions":
            if refused:
                raise RuntimeError(f"--api-prefill completions: {refused}; use --api-prefill instruct")
            return "completions"
        if refused:
            log.warning(
                "--api-prefill auto: instruct, the last resort (the teacher is asked in words to complete "
                "the answer), because %s; choose assistant or continue if this API continues a final "
                "assistant message",
                refused,
            )
            return "instruct"
        log.info(
            "--api-prefill auto: completions (%s answers raw text, so the teacher continues the student's "
            "exact prefix in %s)",
            self.api.completions_url,
            self.template.name,
        )
        return "completions"

    def continuation(self, messages: list[dict], prefix: str) -> tuple[dict, dict]:
        """(request, extra request fields) that ask the API to continue `prefix` as the answer: the request
        is {"prompt": text} for the raw-text endpoint, else {"messages": [...]}."""
        if self.prefill == "completions":
            stop = {"stop": self.template.stop} if self.template.stop else {}
            try:  # a template may refuse some turns (e.g. roles out of order): the caller's messages
                prompt = self.template.render(messages, prefix)
            except ValueError as e:
                raise InvalidRequest(str(e), field="messages") from None
            return {"prompt": prompt}, stop
        if not prefix:
            return {"messages": messages}, {}
        if self.prefill == "assistant":
            return {"messages": [*messages, {"role": "assistant", "content": prefix}]}, {}
        if self.prefill == "continue":
            extra = {"continue_final_message": True, "add_generation_prompt": False}
            return {"messages": [*messages, {"role": "assistant", "content": prefix}]}, extra
        *history, last = messages
        question = last["content"] if last["role"] == "user" else ""
        asked = {"role": "user", "content": INSTRUCT_TEMPLATE.format(question=question, prefix=prefix)}
        return {"messages": [*(history if last["role"] == "user" else messages), asked]}, {}

    def continuation_text(self, prefix: str, text: str) -> tuple[str, int]:
        """(the API's text as a continuation of prefix, characters cut from its start): in instruct mode a
        reply that starts over with the prefix has that repeat cut off."""
        stripped = prefix.strip()
        if self.prefill != "instruct" or not stripped:
            return text, 0
        body = text.lstrip()
        if body.startswith(stripped):
            cut = len(text) - len(body) + len(stripped)
            return text[cut:], cut
        return text, 0

    # ---- what a white-box backend offers, refused with directions --------------------------------------

    def score(
        self, items: list[ScoreItem], top_k: int, temperature: float, ranks: bool = False
    ) -> list[SequenceScores]:
        raise _no_logprobs(self.info.name, "/v1/score")

    def tokenize_text(self, text: str, add_special_tokens: bool) -> list[int]:
        raise _no_logprobs(self.info.name, "/v1/tokenize")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        raise _no_logprobs(self.info.name, "/v1/tokenize")

    def start_generation(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        raise _no_logprobs(self.info.name, "generation from token ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise _no_logprobs(self.info.name, "token ids")

    def token_strings(self, ids: list[int]) -> list[str]:
        raise _no_logprobs(self.info.name, "token ids")


def _no_logprobs(name: str, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"teacher {name!r} is black-box (an OpenAI-compatible chat API): it offers no {what}, only "
        "POST /v1/chunk-score (train with --loss chunk)",
        field="model",
    )
