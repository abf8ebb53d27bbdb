"""The student being trained: loading (device, precision, optional LoRA), its forwards, sampling, saving.

One network, three views of it, held here so the loop never juggles them: `trainable` is what the
optimiser updates and checkpoints hold (a PeftModel with LoRA), `lm` the causal LM inside it, and `scorer`
the module forwards and sampling run through (rollouts.CompletionLogprobs, wrapped for DDP or FSDP2 under
torchrun, distributed.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_student.config import TrainConfig
from opd_student.distributed import SINGLE, World, is_sharded, wrap_student
from opd_student.rollouts import PackedBatch, sample_completions, student_logprobs
from opd_student.sampling_copy import SamplingCopy

_WEIGHTS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast where it is faster: on CUDA with bf16 support, and on CPU (measured ~2x per step here)."""
    if cfg.bf16 != "auto":
        return cfg.bf16 == "true"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


@dataclass
class Student:
    path: Path
    tokenizer: object
    trainable: torch.nn.Module
    lm: torch.nn.Module
    scorer: torch.nn.Module
    device: torch.device
    bf16: bool
    cfg: TrainConfig
    world: World = SINGLE
    initial: torch.nn.Module | None = None  # a frozen copy of the weights the run started from, if asked
    sampling_copy: SamplingCopy | None = None  # rollout_dtype bfloat16: what rollouts are sampled with

    @classmethod
    def load(
        cls,
        path: Path,
        cfg: TrainConfig,
        device: torch.device,
        world: World = SINGLE,
        keep_initial: bool = False,
    ) -> Student:
        trainable, lm, tokenizer = load_student(path, cfg, device)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = tokenizer.eos_token_id
        # Copied before sharding (FSDP2 shards in place) and before any checkpoint is loaded: the copy stays
        # the student the run started from.
        initial = copy.deepcopy(lm).eval().requires_grad_(False) if keep_initial else None
        scorer = wrap_student(lm, cfg.parallel, world)
        sampling = None
        if cfg.rollout_dtype == "bfloat16":
            if is_sharded(lm):
                raise SystemExit(
                    "error: rollout_dtype bfloat16 samples with a whole copy of the student: not with FSDP2's "
                    "sharded parameters (use --parallel ddp, or rollout_dtype weights)"
                )
            sampling = SamplingCopy(lm)
        return cls(
            path,
            tokenizer,
            trainable,
            lm,
            scorer,
            device,
            use_bf16(cfg, device),
            cfg,
            world,
            initial,
            sampling,
        )

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id  # type: ignore[attr-defined]

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id  # type: ignore[attr-defined]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.lm.parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (the LoRA adapters with LoRA)."""
        return [p for p in self.trainable.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.trainable.train(mode)

    def logprobs(self, batch: PackedBatch) -> torch.Tensor:
        """log q [B, T, V] (fp32, on CPU) at the batch's completion positions, with grad where enabled;
        the forward under bf16 autocast when the run uses it."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logprobs_B_T_V = student_logprobs(self.scorer, batch)
        return logprobs_B_T_V.cpu() if logprobs_B_T_V.device.type != "cpu" else logprobs_B_T_V

    def sample(
        self,
        prompt_ids_P: list[list[int]],
        samples_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        row_seeds: list[int],
        logprobs_out: list[list[float]] | None = None,
        processor=None,
    ) -> list[list[list[int]]]:
        """completions_P_G, one seeded sample per row (rollouts.sample_completions). No autocast here: under
        autocast every decoding step re-casts the weights (measured 6x slower on CPU). logprobs_out: filled
        with each row's behaviour logprobs (off-policy corrections, docs/methods.md). With rollout_dtype
        bfloat16 the rollouts come from a bf16 copy of the current weights (sampling_copy.py)."""
        return sample_completions(
            self.sampling_copy.refreshed() if self.sampling_copy is not None else self.scorer,
            prompt_ids_P,
            samples_per_prompt,
            max_new_tokens,
            temperature,
            self.eos_token_id,
            self.pad_token_id,
            row_seeds=row_seeds,
            logprobs_out=logprobs_out,
            processor=processor,
        )

    def save_final(self, out: Path) -> Path:
        """A plain HF directory (rank 0 writes it; FSDP shards are gathered first, LoRA is merged)."""
        model = self.trainable
        if is_sharded(model):
            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if self.world.is_main:
                model = load_student(self.path, self.cfg, torch.device("cpu"))[0]
                model.load_state_dict(full)
        if self.world.is_main:
            save_final(model, self.tokenizer, out, self.cfg.lora)
        return out


def load_student(path, cfg: TrainConfig, device: torch.device):
    """(trainable model, the causal LM to run forwards on, tokenizer). Weights stay in full precision
    (the master copy; bf16 is autocast only)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_WEIGHTS_DTYPES[cfg.weights_dtype]).to(device)
    model.config.use_cache = True
    if not cfg.lora:
        return model, model, tokenizer
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lora)
    # LoRA layers are injected into the base model in place: forwards run on it, the adapters train.
    return peft_model, peft_model.get_base_model(), tokenizer


def save_final(model, tokenizer, out_dir, lora: bool) -> None:
    """A plain HF directory of the trained student (LoRA merged), loadable by `opd eval --student`."""
    if lora:
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
