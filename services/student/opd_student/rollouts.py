"""Sampling rollouts from the student, and packing them into padded tensors for the loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from opd_client.scores import SequenceScores


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled by the student, up to and including EOS (or cut at max_new_tokens)
    teacher_prefix_ids: list[int] | None = None  # privileged context for the teacher, if the prompt had one
    teacher: str | None = None  # teacher name on the service
    prompt_id: str = ""
    on_policy: bool = True  # False: a fixed dataset sequence (GKD mixing)
    loss_spans: list[list[int]] | None = None  # [start, end) characters of the completion the loss may use
    teacher_chat: list[dict] | None = None  # the chat a text-based (black-box) teacher sees first
    # a plain-text prompt as a text-based teacher sees it (None: the prompt is teacher_chat), tokenized by
    # a cross-tokenizer teacher as is, as the student tokenizes it
    teacher_text: str | None = None
    # log μ(x_t) of each completion token under the policy that sampled it, at sampling time (recorded
    # only when an off-policy correction or a behaviour blend needs it; docs/methods.md)
    behaviour_logprobs: list[float] | None = None
    # TRD: completion tokens from this index on were written by the teacher, not sampled by the student
    teacher_from: int | None = None


def row_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (run seed, step, row...): independent streams per key tuple."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededGumbel(LogitsProcessor):
    """Sampling from softmax(logits / T) as argmax(logits / T + Gumbel noise), with each row's noise drawn
    from its own generator: a rollout's tokens depend on its seed, not on the rows it shares a batch with
    or on the rank that samples it, so 1 and N trainer processes sample the same rollouts."""

    def __init__(
        self, seeds: list[int], temperature: float, device: torch.device, record: bool = False
    ) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        # record: log softmax(logits / T) at the token each row samples, per decoding step ([B] each)
        self.record = record
        self.logprobs_S_B: list[torch.Tensor] = []
        self.prompt_width = 0  # set by sample_completions: generated ids start at this column

    def __call__(self, input_ids: torch.Tensor, scores_B_V: torch.Tensor) -> torch.Tensor:
        V = scores_B_V.shape[-1]
        uniform_B_V = torch.stack(
            [torch.rand(V, generator=g, device=scores_B_V.device) for g in self.generators]
        )
        gumbel_B_V = -torch.log(-torch.log(uniform_B_V.clamp_min(1e-20)))
        perturbed_B_V = scores_B_V.float() / self.temperature + gumbel_B_V
        if self.record:  # generate takes the same argmax of what we return: the token sampled
            chosen_B = perturbed_B_V.argmax(-1, keepdim=True)
            logprobs_B_V = torch.log_softmax(scores_B_V.float() / self.temperature, dim=-1)
            self.logprobs_S_B.append(logprobs_B_V.gather(-1, chosen_B)[:, 0].cpu())
        return perturbed_B_V


@torch.no_grad()  # not inference_mode: FSDP2 gathers parameters inside generate
def sample_completions(
    model,
    prompts_P: list[list[int]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    row_seeds: list[int],
    logprobs_out: list[list[float]] | None = None,
    processor: SeededGumbel | None = None,
) -> list[list[list[int]]]:
    """completions_P_G: G sampled completions per prompt (pure sampling: no top-k/top-p truncation);
    row_seeds holds one seed per completion (P × G, prompt-major). With logprobs_out (a list), each row's
    behaviour logprobs log μ(x_t) are appended to it (prompt-major, one per completion token). `processor`
    replaces the plain SeededGumbel (a behaviour blend, methods/behaviour_blend.py); it is told the padded
    prompt width before generation starts."""
    rows = [ids for ids in prompts_P for _ in range(samples_per_prompt)]
    if len(row_seeds) != len(rows):
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(rows)} rows")
    generator = unwrap(model)
    device = generator.device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):  # left padding, so every row's next token comes at the same column
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    gumbel = processor or SeededGumbel(row_seeds, temperature, device, record=logprobs_out is not None)
    gumbel.prompt_width = width
    out = generator.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        do_sample=False,  # the argmax over Gumbel-perturbed logits is the sample
        logits_processor=LogitsProcessorList([gumbel]),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        synced_gpus=getattr(generator, "synced_generation", False),
    )[:, width:].tolist()
    completions = [_cut_at_eos(row, eos_token_id) for row in out]
    if logprobs_out is not None:
        logprobs_B_S = torch.stack(gumbel.logprobs_S_B, dim=1) if gumbel.logprobs_S_B else None
        for b, ids in enumerate(completions):
            logprobs_out.append(logprobs_B_S[b, : len(ids)].tolist() if logprobs_B_S is not None else [])
    return [completions[p * samples_per_prompt : (p + 1) * samples_per_prompt] for p in range(len(prompts_P))]


def _cut_at_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


@dataclass
class PackedBatch:
    """Rollouts right-padded into one forward; completion positions gathered for the loss."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    positions_B_T: torch.Tensor  # index j of the hidden state that predicts completion token t (j = t - 1)
    targets_B_T: torch.Tensor  # the completion tokens (0 at padding)
    mask_B_T: torch.Tensor  # 1.0 on real completion tokens

    @property
    def num_tokens(self) -> int:
        return int(self.mask_B_T.sum().item())


def pack(rollouts: list[Rollout], pad_token_id: int) -> PackedBatch:
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    width, horizon = max(lengths), max(len(r.completion_ids) for r in rollouts)
    B = len(rollouts)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    positions = torch.zeros((B, horizon), dtype=torch.long)
    targets = torch.zeros((B, horizon), dtype=torch.long)
    mask = torch.zeros((B, horizon))
    for b, r in enumerate(rollouts):
        ids = r.prompt_ids + r.completion_ids
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        T, start = len(r.completion_ids), len(r.prompt_ids)
        positions[b, :T] = torch.arange(start - 1, start - 1 + T)
        targets[b, :T] = torch.tensor(r.completion_ids)
        mask[b, :T] = 1.0
    return PackedBatch(input_ids, attention, positions, targets, mask)


class CompletionLogprobs(torch.nn.Module):
    """log q over the vocabulary at completion positions only, as a module: DDP and FSDP2 synchronise
    gradients through the forward of the module they wrap (distributed.py)."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def forward(
        self, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, positions_B_T: torch.Tensor
    ) -> torch.Tensor:
        hidden_B_L_H = self.lm.base_model(
            input_ids=input_ids_B_L, attention_mask=attention_mask_B_L, use_cache=False
        ).last_hidden_state
        index = positions_B_T[:, :, None].expand(-1, -1, hidden_B_L_H.shape[-1])
        hidden_B_T_H = hidden_B_L_H.gather(1, index)
        logits_B_T_V = self.lm.get_output_embeddings()(hidden_B_T_H)
        return torch.log_softmax(logits_B_T_V.float(), dim=-1)

    def generate(self, **kwargs) -> torch.Tensor:
        return self.lm.generate(**kwargs)


def unwrap(model: torch.nn.Module) -> CompletionLogprobs | PreTrainedModel:
    """The module inside DDP (FSDP2 wraps in place: nothing to unwrap): a CompletionLogprobs or a causal LM."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def student_logprobs(model, batch: PackedBatch) -> torch.Tensor:
    """log q over the vocabulary at completion positions only: [B, T, V] (fp32), with grad. `model` is
    a causal LM or a (wrapped) CompletionLogprobs."""
    scorer = model if isinstance(unwrap(model), CompletionLogprobs) else CompletionLogprobs(model)
    device = unwrap(scorer).device
    return scorer(
        batch.input_ids_B_L.to(device), batch.attention_mask_B_L.to(device), batch.positions_B_T.to(device)
    )


@dataclass
class TeacherTensors:
    """Teacher scores padded to the batch: [B, T] and [B, T, K]; zeros at padding (masked later)."""

    token_logprobs_B_T: torch.Tensor
    top_ids_B_T_K: torch.Tensor
    top_logprobs_B_T_K: torch.Tensor
    tail_logprob_B_T: torch.Tensor
    score_logprobs_B_T_M: torch.Tensor | None
    hidden_B_T_D: torch.Tensor | None = None  # the teacher's final hidden states (return_hidden)


def teacher_tensors(scores_B: list[SequenceScores], horizon: int) -> TeacherTensors:
    B, first = len(scores_B), scores_B[0]
    assert first.top_ids_T_K is not None, "token scores come with top_k > 0"
    K = first.top_ids_T_K.shape[1]
    token = torch.zeros((B, horizon))
    top_ids = torch.zeros((B, horizon, K), dtype=torch.long)
    top_lp = torch.zeros((B, horizon, K))
    tail = torch.zeros((B, horizon))
    M = first.score_logprobs_T_M.shape[1] if first.score_logprobs_T_M is not None else None
    score = torch.zeros((B, horizon, M)) if M is not None else None
    # Teachers of one batch (routing) may differ in hidden size: pad to the largest (zeros beyond a row's D).
    widths = [s.hidden_T_D.shape[1] for s in scores_B if s.hidden_T_D is not None]
    hidden = torch.zeros((B, horizon, max(widths))) if widths else None
    for b, s in enumerate(scores_B):
        T = s.num_tokens
        assert s.top_ids_T_K is not None, "token scores come with top_k > 0"
        token[b, :T] = torch.from_numpy(s.token_logprobs_T)
        top_ids[b, :T] = torch.from_numpy(s.top_ids_T_K.astype("int64"))
        top_lp[b, :T] = torch.from_numpy(s.top_logprobs_T_K)
        tail[b, :T] = torch.from_numpy(s.tail_logprob_T)
        if score is not None:
            score[b, :T] = torch.from_numpy(s.score_logprobs_T_M)
        if hidden is not None:
            assert s.hidden_T_D is not None, "every teacher of the batch was asked for hidden states"
            hidden[b, :T, : s.hidden_T_D.shape[1]] = torch.from_numpy(s.hidden_T_D)
    return TeacherTensors(token, top_ids, top_lp, tail, score, hidden)
