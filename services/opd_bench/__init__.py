"""opd_bench: the benchmarks behind docs/benchmarks.md (`opd bench ...`), kept apart from the product.

- memory.py   scoring memory: chunked top-k vs full logits (teacher side)
- serve.py    the service under 1/8/32 clients vs the raw forward (teacher side)
- scale.py    `opd train` in 1 process vs 2 under torchrun, DDP vs FSDP2 (trainer side)
- compare/    opd vs TRL vs SFT on the same models (`opd bench compare`)
- limits.py   memory bandwidth, matmul throughput and the decode/scoring ceilings they set (`opd bench limits`)
- gpu_check.py  the prepared accelerator check: real-size random models, service vs raw, one trainer step
              (`opd bench gpu`, scripts/gpu_check.sh; gpu_models.py builds the models, check_parts.py
              runs the parts under a time budget)
- weight_push.py  a live weight update of the default student over loopback, HTTP and gRPC
              (`opd bench weight-push`)

Benchmarks may import both services (they measure them); neither service imports this package.
"""
