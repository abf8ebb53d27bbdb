"""opd_bench: the benchmarks behind docs/benchmarks.md (`opd bench ...`), kept apart from the product.

- memory.py   scoring memory: chunked top-k vs full logits (teacher side)
- serve.py    the service under 1/8/32 clients vs the raw forward (teacher side)
- scale.py    `opd train` in 1 process vs 2 under torchrun, DDP vs FSDP2 (trainer side)
- compare/    opd vs TRL vs SFT on the same models (`opd bench compare`)

Benchmarks may import both services (they measure them); neither service imports this package.
"""
