"""Request models of the teacher's OpenAI-/vLLM-compatible endpoints (/v1/completions, /v1/chat/completions).

Field names and defaults follow OpenAI's API and vLLM's extensions (vllm/entrypoints/openai: CompletionRequest,
ChatCompletionRequest), so an OpenAI or vLLM client works with only a URL change. The models are strict: an
unknown field is a 422 naming it. Fields that clients commonly send but this server does not implement are
declared so that a harmless value (null, 0, {}, the default) is accepted and ignored, and any value that would
change the result is refused by the service with a 400 naming the field (see docs/api.md). Response bodies
follow OpenAI's shapes (openai.types.Completion / ChatCompletion) and are built as plain JSON.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    """What both endpoints share: model, sampling, stop conditions and the fields accepted but not used."""

    model: StrictStr | None = Field(default=None, description="a served teacher; default: the first one")
    n: StrictInt | None = Field(default=1, description="samples per prompt")
    temperature: Number | None = Field(default=None, description="default 1.0; 0 is greedy")
    top_p: Number | None = Field(default=None, description="nucleus sampling, (0, 1]; default 1.0")
    seed: StrictInt | None = Field(default=None, description="same seed, same request: same samples")
    stop: StrictStr | list[StrictStr] | None = Field(
        default=None, description="strings that end a sample (not included in its text)"
    )
    stream: StrictBool | None = Field(default=False, description="only false: answers are not streamed")
    # vLLM sampling extensions
    top_k: StrictInt | None = Field(
        default=None, description="vLLM: sample among the k most likely; 0/-1: all"
    )
    min_p: Number | None = Field(
        default=None, description="vLLM: drop tokens below min_p x the top probability"
    )
    stop_token_ids: list[StrictInt] | None = Field(default=None, description="vLLM: ids that end a sample")
    ignore_eos: StrictBool = Field(default=False, description="vLLM: keep going past the EOS token")
    skip_special_tokens: StrictBool = Field(
        default=True, description="vLLM: leave special tokens out of text"
    )
    include_stop_str_in_output: StrictBool = Field(default=False, description="vLLM: keep the stop string")
    prompt_logprobs: StrictInt | None = Field(
        default=None,
        description="vLLM: per prompt position, the prompt token and the k most likely tokens with logprob, "
        "rank and decoded text (up to the model's max_top_k; -1: the whole vocabulary)",
    )
    return_token_ids: StrictBool | None = Field(default=None, description="vLLM: add prompt and sample ids")
    return_tokens_as_token_ids: StrictBool | None = Field(
        default=None, description="vLLM: show tokens in logprobs as 'token_id:<id>' instead of their text"
    )
    # Accepted, used only when harmless (see docs/api.md): any other value is a 400 naming the field.
    stream_options: dict[str, Any] | None = Field(default=None, description="only null (no streaming)")
    user: StrictStr | None = Field(default=None, description="ignored")
    logit_bias: dict[str, Number] | None = Field(default=None, description="only null or {}")
    presence_penalty: Number | None = Field(default=None, description="only null or 0")
    frequency_penalty: Number | None = Field(default=None, description="only null or 0")
    repetition_penalty: Number | None = Field(default=None, description="vLLM: only null or 1")
    min_tokens: StrictInt | None = Field(default=None, description="vLLM: only null or 0")


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI's legacy completions with vLLM's extensions)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="text, a batch of texts, token ids, or a batch of token id lists"
    )
    max_tokens: StrictInt | None = Field(
        default=16, description="tokens to generate per sample; 0 only scores the prompt; null: 16"
    )
    echo: StrictBool | None = Field(default=False, description="prepend the prompt (and its logprobs)")
    logprobs: StrictInt | None = Field(
        default=None,
        description="report each token's logprob and the most likely `logprobs` tokens (up to max_top_k)",
    )
    add_special_tokens: StrictBool = Field(
        default=True, description="vLLM: tokenize text prompts with BOS etc."
    )
    best_of: StrictInt | None = Field(default=None, description="only null, 1 or n")
    suffix: StrictStr | None = Field(default=None, description="only null or empty")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = Field(description="text, or text parts (joined)")
    name: StrictStr | None = Field(default=None, description="ignored")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the teacher's chat template, then sampled."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(
        default=None, description="tokens to generate per sample; default: up to max_sequence_len"
    )
    max_tokens: StrictInt | None = Field(default=None, description="deprecated name of max_completion_tokens")
    logprobs: StrictBool | None = Field(default=False, description="report each generated token's logprob")
    top_logprobs: StrictInt | None = Field(
        default=None, description="with logprobs: the most likely tokens per position (up to max_top_k)"
    )
    add_generation_prompt: StrictBool = Field(default=True, description="vLLM: end with the assistant header")
    add_special_tokens: StrictBool = Field(default=False, description="vLLM: add BOS etc. to the template's")
    # Accepted, used only when harmless: any other value is a 400 naming the field.
    response_format: dict[str, Any] | None = Field(default=None, description='only null or {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(default=None, description="only null or []")
    tool_choice: StrictStr | dict[str, Any] | None = Field(default=None, description='only null or "none"')
    parallel_tool_calls: StrictBool | None = Field(default=None, description="ignored")
    metadata: dict[str, Any] | None = Field(default=None, description="ignored")
    store: StrictBool | None = Field(default=None, description="ignored (nothing is stored)")
