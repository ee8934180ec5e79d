"""Benchmarks of docs/benchmarks.md: workloads (datasets), offline throughput, peers (transformers), roofline;
`sluice bench ...` is registered in cli.py."""
