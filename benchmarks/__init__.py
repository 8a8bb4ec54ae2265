"""Benchmarks of the prefix-once log-prob pass: `python -m benchmarks.bench_logprobs --help`."""
