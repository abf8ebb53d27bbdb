"""TrainConfig: the one place every training setting lives, with its default and its meaning.

Values come from (lowest to highest precedence) the defaults below, a TOML/YAML file (`--config`), and
command-line flags, which are generated from these fields (`--max-new-tokens 64`): a field's type gives the
flag's type and choices, its comment gives the flag's `--help` (opd_common.dataclass_flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from opd_common.dataclass_flags import add_dataclass_flags, literal_problems
from opd_student.methods.checks import config_problems

Loss = Literal[
    "reverse_kl",
    "topk_forward_kl",
    "student_topk_reverse_kl",
    "jsd",
    "exact_reverse_kl",
    "exact_forward_kl",
    "exact_jsd",
    "chunk",
]
ChunkReward = Literal["smoothed", "similarity", "edit_similarity"]
ChunkSelect = Literal["entropy", "even"]
LrSchedule = Literal["constant", "cosine"]
Bf16 = Literal["auto", "true", "false"]
Parallel = Literal["fsdp", "ddp"]
WeightsDtype = Literal["float32", "float64"]
RolloutDtype = Literal["weights", "bfloat16"]
HiddenDtype = Literal["auto", "float32", "bfloat16", "float16"]
CognizanceGate = Literal["off", "entropy", "margin"]
OffPolicyCorrection = Literal["off", "truncate", "clip", "drpo"]
StudentTopkForm = Literal["tail", "truncated", "truncated_sg"]
LOSSES = get_args(Loss)


@dataclass(frozen=True)
class TrainConfig:
    # --- teacher service
    # None: start a local `opd serve-teacher` (embedded teacher). Replicas: comma-separated URLs, or a name
    # resolving to several addresses (round-robin with failover).
    teacher_url: str | None = None
    teacher_api_key_env: str = "OPD_TEACHER_API_KEY"  # env var holding the key, if the service needs one
    teacher_model: str | None = None  # teacher name on the service (default: its first)
    teacher_timeout_s: float = 120.0  # per request
    teacher_wait_s: float = 1800.0  # how long to keep retrying an unreachable teacher before giving up
    max_inflight_requests: int = 4  # scoring requests in flight at once
    max_staleness: int = 1  # rollouts may come from a policy this many steps old (0: no overlap)
    # push the student's weights to the teacher every N steps (0: off): a teacher that learns (self- and
    # co-distillation). The teacher must serve the student's architecture with --weight-updates
    teacher_follows_student: int = 0
    # the teacher is the student itself: without teacher_url, opd train starts a teacher serving the
    # student's starting weights (with teacher_follows_student N, its current ones), for prompts whose
    # teacher_messages give it privileged context (on-policy self-distillation, docs/methods.md)
    self_distillation: bool = False
    # with teacher_follows_student: push the student's weights to this service instead of the teacher it
    # trains against (co-distillation: the service the peer trains against; opd codistill sets it)
    student_push_url: str | None = None
    student_push_model: str | None = None  # the student's name on that service (default: its first model)
    # the environment variable holding that service's key (unset: the teacher's key)
    student_push_api_key_env: str = "OPD_STUDENT_PUSH_API_KEY"
    # --- student and data
    student: str = "default"  # HF directory, or "default": the layer-pruned embedded teacher
    prompts: str = "default-train"  # JSONL file, or the shipped set
    eval_prompts: str = "default-heldout"  # held-out prompts for the KL before/during/after (file or set)
    dataset: str | None = None  # JSONL of fixed {"prompt"/"messages", "completion"} for GKD mixing
    # --- rollouts
    steps: int = 20  # optimizer steps
    prompts_per_step: int = 4  # prompts drawn per step (under torchrun: a multiple of the rank count)
    samples_per_prompt: int = 2  # G: rollouts sampled per prompt
    max_new_tokens: int = 48  # longest rollout completion, in tokens
    temperature: float = 1.0  # the student's sampling temperature for rollouts
    # --- loss
    # reverse_kl: the sampled token's teacher logprob as a per-token advantage; topk_forward_kl / jsd: the
    # teacher's top-k + tail; student_topk_reverse_kl: the teacher scores the student's top-k; chunk: a
    # black-box teacher's chunk rewards; exact_*: the teacher's full distribution from its hidden states
    # and output head (docs/training.md)
    loss: Loss = "reverse_kl"
    top_k: int = 20  # teacher top-k (forward KL, JSD) or student top-k (student_topk_reverse_kl)
    jsd_beta: float = 0.5  # jsd, exact_jsd: β of GKD's generalised JSD (0: forward KL, 1: reverse KL)
    # exact_*: dtype of the hidden states on the wire (auto: the teacher's compute dtype)
    hidden_dtype: HiddenDtype = "auto"
    # exact_*: both distributions at this temperature, log_softmax(logits / τ) (no τ² factor)
    distill_temperature: float = 1.0
    discount: float = 0.0  # reverse_kl: γ of the return-to-go advantage (0: per-token reward)
    gkd_lambda: float = 1.0  # probability a step uses on-policy rollouts; else `dataset` sequences
    # --- a teacher with another tokenizer (docs/methods.md, cross-tokenizer distillation)
    # allow a teacher whose tokenizer differs from the student's: it scores the student's text with its own
    # tokens (POST /v1/score-text), the two are aligned by byte spans and reverse_kl runs over aligned spans
    cross_tokenizer: bool = False
    # cross_tokenizer: weight of the forward KL on the teacher's top-k tokens that are student tokens too
    xtok_topk_coef: float = 0.0
    # cross_tokenizer: weight of the ULD term (sorted probabilities) on the rest of the two distributions
    xtok_uld_coef: float = 0.0
    # --- loss = "chunk": a black-box teacher (opd serve-teacher --backend openai, POST /v1/chunk-score)
    # The defaults (KD on the API's top logprobs, one 64-token continuation a rollout, no samples) lowered
    # the KL to a white-box copy most per API token of the settings measured (docs/benchmarks.md)
    chunk_num: int = 1  # M chunks scored per completion
    chunk_tokens: int = 8  # C student tokens per chunk
    chunk_samples: int = 0  # N teacher samples per chunk, for the chunk reward (0: no samples, no reward)
    # entropy: chunks start where the student is least sure; even: spread out
    chunk_select: ChunkSelect = "entropy"
    # smoothed: (k + α·prior)/(N + α) of k matching samples; similarity: mean cosine; edit_similarity
    chunk_reward: ChunkReward = "smoothed"
    # subtract the step's mean chunk reward (chunks worse than average are pushed down)
    chunk_baseline: bool = True
    chunk_threshold: float = 0.7  # embedding cosine at which a teacher sample matches the student's chunk
    chunk_prior: float = 0.5  # the smoothed reward's prior share of matching samples
    chunk_alpha: float = 1.0  # the prior's weight, in pseudo-samples
    chunk_teacher_temperature: float = 1.0  # the API teacher's sampling temperature (0: greedy)
    chunk_kl_coef: float = 0.0  # weight of KL(student ‖ initial student) on the tokens outside chunks
    # weight of the top-k forward KL on the teacher's greedy continuation of each chunk's prefix, from the
    # API's top logprobs (0: off; signals/continuation_kd.py)
    chunk_kd_coef: float = 1.0
    chunk_continuation_tokens: int = 64  # tokens of that greedy continuation (0: chunk_tokens)
    chunk_top_logprobs: int = 20  # alternatives asked per greedy token (the service caps it at the API's)
    # loss chunk: at every eval also the held-out KL to this white-box service (an open copy of the API's
    # model under opd serve-teacher), beside the chunk reward; its key is read from eval_teacher_api_key_env
    eval_teacher_url: str | None = None
    eval_teacher_api_key_env: str = "OPD_EVAL_TEACHER_API_KEY"
    api_prompt_price: float = 0.0  # loss chunk: price per million API prompt tokens (> 0: log api/cost)
    api_completion_price: float = 0.0  # loss chunk: price per million API completion tokens
    # --- methods (docs/methods.md); all off by default
    horizon_ratio: float = 1.0  # TOPD ρ: rollouts stop after ⌊ρ·max_new_tokens⌋ tokens
    horizon_start: int = 0  # POPD H0 (0: off): H_k = min(T, H0 + horizon_growth·⌊k / horizon_every⌋)
    horizon_growth: int = 0  # POPD ΔH
    horizon_every: int = 1  # POPD Δk
    ta_opd: bool = False  # TA-OPD: the loss applies to the step's most teachable tokens only
    ta_fraction: float = 0.05  # share of the step's tokens kept
    ta_student_top_k: int = 10  # K_s: the student's candidate set in the teachability score
    fire_opd: bool = False  # FiRe-OPD style: drop the worst rollouts, weight tokens by confidence
    fire_drop_fraction: float = 0.2  # share of the step's rollouts dropped (lowest teacher mean logprob)
    fire_reweight: bool = True  # weight tokens by teacher confidence · (1 − student confidence)
    privileged_context: bool = True  # the teacher sees a prompt's teacher_messages instead of its prompt
    # EDGE-OPD's evidence mask (our reading): the loss only at tokens where the privileged context supports
    # the sampled token, log p(x_t | teacher_messages) − log p(x_t | prompt) > evidence_threshold
    evidence_mask: bool = False
    evidence_threshold: float = 0.0  # nats of evidence a token needs to stay in the loss
    # OPCoD's cognizance gating (our reading): the loss only where the teacher is confident, by its entropy
    # over the top-k + tail (entropy: H <= cognizance_threshold) or its top-1 − top-2 probability margin
    # (margin: >= cognizance_threshold)
    cognizance_gate: CognizanceGate = "off"
    cognizance_threshold: float = 1.0  # nats of teacher entropy at most, or probability margin at least
    loss_token_ids: str = ""  # token-restricted loss: only these ids ("12, 345" or a file of ids)
    loss_regex: str = ""  # ... and/or tokens inside matches of this regex in the decoded completion
    teacher_rules: str = ""  # "PATTERN => NAME; ...": route prompts to teachers by their text
    local_teacher_models: str = ""  # --model specs of the teacher opd train starts (no teacher_url)
    # more `opd serve-teacher` flags for the teacher opd train starts (no teacher_url), e.g. a steering
    # vector: "--steering-vector FILE --steering-scale 4" (SafeSteer, docs/methods.md)
    local_teacher_args: str = ""
    # --- what a step updates, and what else it learns (docs/methods.md); all off by default
    # train only the coordinates this mask marks (opd analyze-update BEFORE AFTER --mask FILE); the others
    # keep the starting values (start from BEFORE: --student)
    update_mask: str | None = None
    # EffOPD-style module allocation (our reading): after effopd_probe_steps steps, keep training only the
    # modules that moved most (relative to their starting norm), freeze the others
    effopd: bool = False
    effopd_probe_steps: int = 4  # optimizer steps measured before the allocation
    effopd_keep_fraction: float = 0.5  # share of the parameters kept training (the fastest-moving modules)
    # α of the next-token loss on lm_data mixed into every step, (1 − α)·OPD + α·LM (0: off)
    lm_coef: float = 0.0
    # the LM loss's texts: JSONL of {"text": ...} or prompt lines with a "completion", or the shipped
    # default-reference (default-privileged's reference answers)
    lm_data: str = "default-reference"
    lm_batch_size: int = 4  # texts per step
    lm_max_tokens: int = 128  # tokens of each text the LM loss applies to
    # Draft-OPD (our reading): train the student as the teacher's speculative draft, on the teacher's greedy
    # answers and G blocks of draft_block tokens replayed from draft_replays of each answer's error positions
    draft_opd: bool = False
    draft_block: int = 4
    draft_replays: int = 2
    # --- methods II: credit, routing, off-policy correction (docs/methods.md); all off by default
    # reverse_kl with stale rollouts (max_staleness): reweight each token by ρ = q_θ(x)/μ(x), μ the sampling
    # policy's recorded logprob. truncate: min(ρ, is_cap); clip: PPO's clipped surrogate (ppo_clip); drpo:
    # DRPO's smooth advantage-weighted quadratic on the probability shift (drpo_delta)
    off_policy_correction: OffPolicyCorrection = "off"
    is_cap: float = 2.0  # truncate: the largest importance ratio a token may get
    ppo_clip: float = 0.2  # clip: ε of PPO's [1 − ε, 1 + ε]
    drpo_delta: float = 0.1  # drpo: the probability shift |q_θ(x) − μ(x)| where the gradient reaches 0
    # GAE-OPD (our reading): generalised advantage estimation over the per-token rewards log p − log q, the
    # value V(s_t) = −KL(q_t‖p_t) on the teacher's top-k (vOPD's closed form)
    gae_opd: bool = False
    gae_gamma: float = 1.0  # γ of GAE-OPD
    gae_lambda: float = 0.95  # λ of GAE-OPD
    # TOPD's near-future guidance (our reading): A_t = mean reward over the next W tokens, and no loss at
    # high-loss tokens whose next W tokens' mean KL(q‖p) is at most near_future_threshold (0: off)
    near_future_window: int = 0
    near_future_threshold: float = 1.0  # nats: "high loss" and "divergent" both mean above this
    # Lookahead Group Reward (our reading): at each rollout's highest-entropy positions, the student's top
    # candidates get group-normalised rewards from the teacher's confidence one step after them
    lookahead_group: bool = False
    lookahead_candidates: int = 4  # K: the student's top-K ids scored at a triggered position
    lookahead_positions: int = 2  # M: triggered positions per rollout (largest student entropy)
    lookahead_coef: float = 1.0  # weight of the lookahead term beside the sampled-token loss
    # CR-OPD (our reading): where the sampled token's reward is below cr_threshold, move mass toward the
    # student's top-cr_top_k ids in proportion to the teacher's probabilities of them
    cr_opd: bool = False
    cr_top_k: int = 8  # the student's reachable alternatives per position
    cr_threshold: float = 0.0  # route where log p(x_t) − log q(x_t) is below this
    cr_coef: float = 1.0  # weight of the routed term
    # TRB: early rollouts sampled from μ ∝ q^(1−β) p^β, the closest-to-teacher blend with KL(μ‖q) <= ε_k,
    # ε_k = trb_epsilon · (1 − k / trb_steps) annealed to 0 (0: off)
    trb_epsilon: float = 0.0
    trb_steps: int = 8  # steps over which the KL budget falls to 0
    # TRD (our reading): a rollout is cut at its first token the teacher gives logprob < trd_min_logprob and
    # the teacher (its own generation) continues from there; the teacher's tokens get the likelihood loss
    trd: bool = False
    trd_min_logprob: float = -4.0  # nats: the teacher logprob below which a sampled token "fails"
    # student_topk_reverse_kl's form (the comprehensive study's stop-gradient variants): tail (top-k + tail
    # bucket), truncated (top-k only, full gradient), truncated_sg (top-k only, log ratio detached)
    student_topk_form: StudentTopkForm = "tail"
    # off-policy cold start: this many SFT steps on the teacher's own samples before the first OPD step
    cold_start_steps: int = 0
    # teacher-aligned prompt selection: keep this share of the training prompts, those whose student answer
    # the teacher likes most (mean log p per token of one seeded answer each; 1: all prompts)
    prompt_selection_fraction: float = 1.0
    prompt_selection_tokens: int = 16  # length of the answer each prompt is judged by
    # --- optimisation
    lr: float = 5e-5  # AdamW learning rate
    lr_schedule: LrSchedule = "constant"  # after warmup: constant, or cosine decay to 0 at the last step
    warmup_steps: int = 0  # linear warmup of the learning rate over this many steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient's global norm to this (0: no clipping)
    micro_batch_size: int = 4  # sequences per forward/backward (gradient accumulation over the step)
    bf16: Bf16 = "auto"  # auto: bf16 autocast where faster (CPU, CUDA); "true" / "false" to force
    lora: bool = False  # train LoRA adapters (peft) instead of all weights; final/ holds them merged
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling α
    device: str = "auto"  # auto (CUDA if available, else CPU), cpu, cuda, cuda:N
    # dtype of the student's master weights; float64 (with bf16 false) makes runs that differ only in
    # summation order (1 vs N ranks) agree to ~1e-12, which the tests use to compare code paths
    weights_dtype: WeightsDtype = "float32"
    # rollouts sampled with the master weights, or a bf16 copy of them (faster decoding; opd bench rollouts)
    rollout_dtype: RolloutDtype = "weights"
    # Under torchrun: how gradients are synchronised (docs/scale.md). fsdp: FSDP2, parameters, gradients
    # and optimiser state sharded over the ranks; ddp: a whole copy per rank (faster for small students).
    parallel: Parallel = "fsdp"
    # --- bookkeeping
    out: str = "runs/opd"  # run directory: config, metrics.jsonl, checkpoints/, final/, report
    seed: int = 0  # prompt order, rollout sampling and held-out samples all derive from it
    save_every: int = 10  # checkpoint every N steps (and at the end or on SIGTERM; 0: only then)
    keep_checkpoints: int = 2  # newest checkpoints kept
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    eval_num_prompts: int = 32  # held-out prompts per evaluation (one seeded sample each)
    eval_max_new_tokens: int = 48  # longest held-out answer, in tokens

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1; got {self.steps}"),
            (self.prompts_per_step >= 1, f"prompts_per_step must be >= 1; got {self.prompts_per_step}"),
            (self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1; got {self.samples_per_prompt}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1; got {self.max_new_tokens}"),
            (self.temperature > 0, f"temperature must be > 0; got {self.temperature}"),
            (
                self.distill_temperature > 0,
                f"distill_temperature must be > 0; got {self.distill_temperature}",
            ),
            (self.top_k >= 1, f"top_k must be >= 1; got {self.top_k}"),
            (0 <= self.jsd_beta <= 1, f"jsd_beta must be in [0, 1]; got {self.jsd_beta}"),
            (0 <= self.discount <= 1, f"discount must be in [0, 1]; got {self.discount}"),
            (0 <= self.gkd_lambda <= 1, f"gkd_lambda must be in [0, 1]; got {self.gkd_lambda}"),
            (self.gkd_lambda == 1 or self.dataset, "gkd_lambda < 1 needs a dataset of fixed sequences"),
            (self.loss != "chunk" or self.gkd_lambda == 1, "loss chunk is on-policy only (gkd_lambda = 1)"),
            (self.chunk_num >= 1 and self.chunk_tokens >= 1, "chunk_num and chunk_tokens must be >= 1"),
            (self.chunk_samples >= 0, f"chunk_samples must be >= 0; got {self.chunk_samples}"),
            (self.chunk_kd_coef >= 0, f"chunk_kd_coef must be >= 0; got {self.chunk_kd_coef}"),
            (
                self.chunk_continuation_tokens >= 0,
                f"chunk_continuation_tokens must be >= 0; got {self.chunk_continuation_tokens}",
            ),
            (self.chunk_top_logprobs >= 0, f"chunk_top_logprobs must be >= 0; got {self.chunk_top_logprobs}"),
            (
                self.chunk_samples > 0 or self.chunk_kd_coef > 0,
                "chunk_samples 0 leaves loss chunk without a signal: set chunk_kd_coef > 0",
            ),
            (
                self.chunk_kd_coef == 0 or self.chunk_top_logprobs >= 1,
                "chunk_kd_coef > 0 distils the API's top logprobs: chunk_top_logprobs must be >= 1",
            ),
            (0 <= self.chunk_prior <= 1, f"chunk_prior must be in [0, 1]; got {self.chunk_prior}"),
            (self.chunk_alpha >= 0, f"chunk_alpha must be >= 0; got {self.chunk_alpha}"),
            (self.chunk_kl_coef >= 0, f"chunk_kl_coef must be >= 0; got {self.chunk_kl_coef}"),
            (
                self.eval_teacher_url is None or not self.cross_tokenizer,
                "eval_teacher_url measures the held-out KL to a service with the student's tokenizer; "
                "cross_tokenizer runs evaluate by text against their own teacher",
            ),
            (
                self.api_prompt_price >= 0 and self.api_completion_price >= 0,
                "api_prompt_price and api_completion_price must be >= 0",
            ),
            (
                not self.cross_tokenizer or self.loss == "reverse_kl",
                f"cross_tokenizer distils over aligned text spans with loss reverse_kl; got loss {self.loss}",
            ),
            (
                self.xtok_topk_coef >= 0 and self.xtok_uld_coef >= 0,
                "xtok_topk_coef and xtok_uld_coef must be >= 0",
            ),
            (
                self.cross_tokenizer or not (self.xtok_topk_coef or self.xtok_uld_coef),
                "xtok_topk_coef and xtok_uld_coef are terms of cross_tokenizer runs: set cross_tokenizer = true",
            ),
            (
                self.teacher_follows_student >= 0,
                f"teacher_follows_student must be >= 0 (0: off); got {self.teacher_follows_student}",
            ),
            (
                not (self.self_distillation and (self.teacher_url or self.local_teacher_models)),
                "self_distillation starts a teacher serving the student: leave teacher_url and "
                "local_teacher_models unset (or serve the student yourself: opd serve-teacher --model STUDENT "
                "--weight-updates, and leave self_distillation off)",
            ),
            (
                not (self.teacher_follows_student and self.loss.startswith("exact_")),
                f"loss {self.loss} keeps the teacher's output head from the start; with teacher_follows_student "
                "the head changes at every push: use reverse_kl, topk_forward_kl, jsd or student_topk_reverse_kl",
            ),
            (
                self.student_push_url is None or self.teacher_follows_student > 0,
                "student_push_url says where teacher_follows_student pushes: set teacher_follows_student N",
            ),
            (
                self.cognizance_gate == "off" or self.loss != "chunk",
                "cognizance_gate reads the teacher's top-k: it needs a logprob loss, not loss chunk",
            ),
            (
                self.cognizance_gate != "margin" or (0 <= self.cognizance_threshold <= 1 and self.top_k >= 2),
                "cognizance_gate margin: cognizance_threshold is a probability margin in [0, 1] and needs "
                f"top_k >= 2; got {self.cognizance_threshold} and top_k {self.top_k}",
            ),
            (
                self.cognizance_gate != "entropy" or self.cognizance_threshold >= 0,
                f"cognizance_gate entropy: cognizance_threshold is nats >= 0; got {self.cognizance_threshold}",
            ),
            (
                not self.evidence_mask or self.privileged_context,
                "evidence_mask compares the teacher with and without teacher_messages: it needs "
                "privileged_context = true",
            ),
            (self.max_staleness >= 0, f"max_staleness must be >= 0; got {self.max_staleness}"),
            (self.max_inflight_requests >= 1, "max_inflight_requests must be >= 1"),
            (self.micro_batch_size >= 1, f"micro_batch_size must be >= 1; got {self.micro_batch_size}"),
            (self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0"),
        ]
        problems = literal_problems(self) + [message for ok, message in checks if not ok]
        problems += config_problems(self)
        if problems:
            raise ValueError(f"config: {problems[0]}")

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file; keys are TrainConfig fields (dashes allowed)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        data = tomllib.loads(text)
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (default None, so only flags the user gave override the file)."""
    parser.add_argument("--config", type=Path, help="TOML or YAML file with TrainConfig settings")
    add_dataclass_flags(parser, TrainConfig)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
