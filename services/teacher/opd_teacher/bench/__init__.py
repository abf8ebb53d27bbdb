"""Benchmarks behind `opd bench ...`; each module measures one thing and documents how (docs/benchmarks.md)."""
