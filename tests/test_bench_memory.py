"""`opd bench memory`: chunked top-k scoring peaks lower than full logits, and both give the same top-k."""

from __future__ import annotations

import argparse
import time

import torch

from opd_bench.memory import MIB, MemoryProbe, main_from_args, register, run_memory_bench


def test_probe_sees_an_allocation_made_inside_it():
    with MemoryProbe(torch.device("cpu")) as probe:
        block = torch.ones(64 * MIB // 4)  # 64 MiB, every page written
        time.sleep(0.05)  # held for ten sampling intervals, so the sampler must see it
        del block
    report = probe.report()
    assert 60 <= report["peak_over_baseline_mib"] <= 96, report
    assert report["rss_samples"] >= 1


def test_chunked_peak_is_lower_than_full_logits_and_top_k_agree(tiny_model_dir):
    # Tiny model with the real 49152-token vocab: logits dominate memory, as with a real teacher. Chunks of
    # 256 rows (48 MiB) are above glibc's mmap threshold, so they go back to the OS when freed; much smaller
    # ones land in the heap and make RSS noisy.
    result = run_memory_bench(batch=2, seq_len=1024, prompt_len=16, top_k=20, chunk_tokens=256,
                              device="cpu", dtype="float32", model=str(tiny_model_dir),
                              variants=("chunked", "full"))  # fmt: skip
    chunked, full = result["variants"]["chunked"], result["variants"]["full"]
    theory = result["theory_mib"]
    assert chunked["scored_positions"] == full["scored_positions"] == 2 * (1024 - 16)

    # The full variant holds logits and their log-softmax at once: 2 x 2048 x 49152 x 4 bytes = 768 MiB.
    assert full["peak_over_baseline_mib"] >= 0.9 * theory["full_logits_plus_log_softmax"], result
    # Chunking saves at least one full-logits tensor (384 MiB) against the naive way.
    assert chunked["peak_over_baseline_mib"] + theory["full_logits"] <= full["peak_over_baseline_mib"], result

    agree = result["agreement"]
    assert agree["top_logprobs_max_abs_diff"] <= 1e-4, agree
    assert agree["token_logprobs_max_abs_diff"] <= 1e-4, agree
    assert agree["top_ids_equal_fraction"] >= 0.99, agree


def test_register_adds_memory_with_the_documented_flags():
    parser = argparse.ArgumentParser(prog="opd bench")
    register(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["memory", "--batch", "2", "--seq-len", "128", "--top-k", "5",
                              "--chunk-tokens", "32", "--device", "cpu", "--dtype", "float32"])  # fmt: skip
    assert args.func is main_from_args
    assert (args.batch, args.seq_len, args.top_k, args.chunk_tokens) == (2, 128, 5, 32)
    assert (args.device, args.dtype, args.json_out) == ("cpu", "float32", None)
