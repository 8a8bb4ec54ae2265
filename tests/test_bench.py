"""The benchmark harness: FLOP-limit maths against hand-computed values, and a tiny CPU run."""
from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.flops import (
    attention_flops_per_pair,
    attention_pair_ratio,
    attention_pairs,
    flop_count,
    flop_limit,
    linear_flops_per_token,
    token_ratio,
)
from benchmarks.peer import attach_peer, default_head_logprobs, peer_completion_logprobs
from benchmarks.report import COLUMNS, Row, format_table, read_csv, write_csv
from benchmarks.shapes import ModelShape, get_shape
from reference import padded_completion_logprobs, random_grpo_batch, tiny_causal_lm

REPO = Path(__file__).resolve().parent.parent

# 1 layer, h=4, 2 heads of D=2, 1 kv head, MLP 8, vocab 10
SMALL = ModelShape("small", layers=1, hidden=4, heads=2, kv_heads=1, intermediate=8, vocab=10, tie_embeddings=False)


def test_token_ratio_matches_the_issue_formula_at_the_cpu_preset():
    # G(P+S)/(P+GS) = 8*2176 / (2048+1024)
    assert token_ratio(2048, 128, 8) == pytest.approx(17408 / 3072, rel=1e-12)


def test_attention_pair_ratio_matches_the_issue_formula_at_the_cpu_preset():
    # G(P+S)^2 / (P^2 + GS(2P+S)) = 8*2176^2 / (2048^2 + 8*128*4224)
    assert attention_pair_ratio(2048, 128, 8) == pytest.approx(37879808 / 8519680, rel=1e-12)


def test_ratios_are_one_for_a_single_member():
    assert token_ratio(100, 7, 1) == 1.0
    assert attention_pair_ratio(100, 7, 1) == 1.0


def test_exact_pairs_count_by_hand():
    # P=2, S=1, G=2. baseline: two sequences of 3 -> 2 * 6 = 12.
    # grouped: prefix 3 pairs; each suffix token sees 2 prefix keys and itself -> 3 + 2*3 = 9.
    assert attention_pairs(2, 1, 2, grouped=False) == 12
    assert attention_pairs(2, 1, 2, grouped=True) == 9


def test_exact_pairs_approach_the_continuum_ratio_for_long_sequences():
    exact = attention_pairs(8192, 512, 16, grouped=False) / attention_pairs(8192, 512, 16, grouped=True)
    assert exact == pytest.approx(attention_pair_ratio(8192, 512, 16), rel=1e-3)


def test_per_token_and_per_pair_flops_by_hand():
    # q 4*4, k and v 4*2 each, o 4*4, mlp 3*4*8 -> 16+16+16+96 = 144 MACs -> 288 FLOPs
    assert linear_flops_per_token(SMALL) == 288
    # QK^T and PV, each D multiply-adds per head: 2 matmuls * 2 FLOPs * D=2 * 2 heads = 16
    assert attention_flops_per_pair(SMALL) == 16


def test_flop_limit_by_hand():
    # P=2, S=1, G=2, fwd+bwd = 3x forward (cancels in the ratio).
    # baseline: 6 tokens * 288 + 12 pairs * 16 + 2 head tokens * 2*4*10 = 1728 + 192 + 160 = 2080
    # grouped:  4 tokens * 288 +  9 pairs * 16 + 160                      = 1152 + 144 + 160 = 1456
    assert flop_count(SMALL, 2, 1, 2, grouped=False).total == 3 * 2080
    assert flop_limit(SMALL, 2, 1, 2) == pytest.approx(2080 / 1456, rel=1e-12)


def test_flop_limit_lies_between_one_and_the_token_ratio():
    shape = get_shape("1.5b")
    limit = flop_limit(shape, 8192, 512, 16)
    assert 1.0 < limit < token_ratio(8192, 512, 16)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_flop_maths_rejects_non_positive_lengths(bad):
    with pytest.raises(ValueError, match="P must be a positive int"):
        token_ratio(bad, 4, 2)


def test_unknown_shape_names_the_choices():
    with pytest.raises(ValueError, match="1.5b"):
        get_shape("13b")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_peer_logprobs_match_the_standard_forward(seed, padding_side):
    prompt_ids, prompt_mask, completion_ids, completion_mask, sizes = random_grpo_batch(seed, padding_side)
    reference = tiny_causal_lm("qwen2")
    peer = tiny_causal_lm("qwen2")
    kwargs = attach_peer(peer)
    with torch.no_grad():
        expected, _ = padded_completion_logprobs(reference, prompt_ids, prompt_mask, completion_ids,
                                                 completion_mask, sizes)
        got = peer_completion_logprobs(peer, prompt_ids, prompt_mask, completion_ids, completion_mask, sizes,
                                       head_logprobs=default_head_logprobs(peer), forward_kwargs=kwargs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_csv_round_trips_and_table_has_one_line_per_row(tmp_path):
    rows = [Row(64, 16, 2, "ours", 1.5, 1.4, 10.0, 1.4, 1.2, 1.1, 1.6, 87.5),
            Row(64, 16, 2, "peer", 2.0, 1.9, 20.0, 1.05, 0.9, 1.0, 1.6, 65.6)]
    write_csv(rows, tmp_path / "x.csv")
    assert read_csv(tmp_path / "x.csv") == rows
    assert len(format_table(rows).splitlines()) == 2 + len(rows)


def test_cpu_preset_smoke_run_writes_finite_outputs(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.bench_logprobs", "--preset", "ci", "-P", "24", "-S", "8",
           "-G", "2", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "bench_logprobs.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [list(line) for line in lines] == [COLUMNS] * 4  # one grid point x 4 variants
    assert {line["variant"] for line in lines} == {"baseline", "hf_sdpa", "peer", "ours"}
    numbers = [float(line[c]) for line in lines for c in COLUMNS[4:]]
    assert all(math.isfinite(x) for x in numbers)
    assert (tmp_path / "bench_logprobs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "agreement" in done.stdout


def test_forest_work_by_hand_and_the_two_level_counts_agree():
    from benchmarks.flops import forest_flops, forest_work

    # root of 3, a child of 2 under it, a grandchild of 1: pairs 6 + (2*3 + 3) + (1*5 + 1) = 21
    assert forest_work([-1, 0, 1], [3, 2, 1]) == (6, 21)
    shape = get_shape("tiny")
    grouped = forest_flops(shape, [-1, 0, 0, 0], [2048, 128, 128, 128], 3 * 128)
    assert grouped.total == pytest.approx(flop_count(shape, 2048, 128, 3, grouped=True).total, rel=1e-12)
    standard = forest_flops(shape, [-1] * 3, [2048 + 128] * 3, 3 * 128)
    assert standard.total == pytest.approx(flop_count(shape, 2048, 128, 3, grouped=False).total, rel=1e-12)


def tree_preset_flops(p, shape: ModelShape) -> dict[str, float]:
    """Forward+backward FLOPs (3x forward) of bench_tree's three variants, counted here from the preset's lengths:
    the linears per token, the attention per attended pair, the LM head per completion token."""
    B, n, q, G, S = p.prompts, p.preamble, p.question, p.group_size, p.completion
    pairs = lambda k, above: k * above + k * (k + 1) // 2  # k tokens causally over themselves, fully over `above`
    tokens_and_pairs = {
        "standard": (B * G * (n + q + S), B * G * pairs(n + q + S, 0)),
        "two_level": (B * (n + q + G * S), B * (pairs(n + q, 0) + G * pairs(S, n + q))),
        "tree": (n + B * (q + G * S), pairs(n, 0) + B * (pairs(q, n) + G * pairs(S, n + q))),
    }
    head = B * G * S * 2 * shape.hidden * shape.vocab
    return {v: 3.0 * (t * linear_flops_per_token(shape) + a * attention_flops_per_pair(shape) + head)
            for v, (t, a) in tokens_and_pairs.items()}


def test_tree_benchmark_smoke_run_reports_flops_of_its_lengths_and_ratios_of_its_own_medians(tmp_path):
    """The three variants agree (checked inside); each row's GFLOP is its forest's, its FLOP limits are those
    FLOPs' ratios, and its speedups are ratios of the medians in the same table."""
    from benchmarks import bench_tree

    preset = bench_tree.PRESETS["smoke"]
    rows = {r["variant"]: r for r in bench_tree.run(preset, threads=1)}
    flops = tree_preset_flops(preset, get_shape(preset.shape))
    ms = {v: r["median_ms"] for v, r in rows.items()}
    for v, r in rows.items():
        assert r["gflop"] == pytest.approx(flops[v] / 1e9, rel=1e-12), v
        assert r["flop_limit"] == pytest.approx(flops["standard"] / flops[v], rel=1e-12), v
        assert r["flop_limit_vs_two_level"] == pytest.approx(flops["two_level"] / flops[v], rel=1e-12), v
        assert r["x_standard"] == pytest.approx(ms["standard"] / ms[v], rel=1e-12), v
        assert r["x_two_level"] == pytest.approx(ms["two_level"] / ms[v], rel=1e-12), v
        assert r["pct_of_limit"] == pytest.approx(100 * r["x_standard"] / r["flop_limit"], rel=1e-12), v
    assert rows["tree"]["flop_limit"] > rows["two_level"]["flop_limit"] > 1.0
    bench_tree.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert "| tree |" in (tmp_path / "tree_smoke.md").read_text()


def test_sequence_parallel_benchmark_smoke_run_writes_its_table(tmp_path):
    """Two launches (SP 1 and 2, real launcher): the table has a row per (P, SP) and the activation ratio."""
    from benchmarks import bench_sequence_parallel

    bench_sequence_parallel.main(["--preset", "smoke", "--out", str(tmp_path)])
    text = (tmp_path / "sequence_parallel_smoke.md").read_text()
    assert "| 64 | 1 |" in text and "| 64 | 2 |" in text and "Longest measured P within" in text


def test_rollout_benchmark_smoke_run_writes_its_table_and_plot(tmp_path):
    """Three variants (shared cache, repeated cache, stock generate), each in its own process, side by side; the
    derived columns are ratios of the measured ones, and the K/V columns are the shape's."""
    from benchmarks import bench_rollout

    cmd = [sys.executable, "-m", "benchmarks.bench_rollout", "--preset", "smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "bench_rollout.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    vllm = importlib.util.find_spec("vllm") is not None  # its own checks: tests/vllm_rollouts/test_vllm_bench.py
    assert [line["variant"] for line in lines] == ["shared", "repeat", "stock"] + ["vllm"] * vllm
    if not vllm:  # skipped, saying so, and the run goes on as before
        assert "note: the vllm variant is skipped: vLLM is not installed" in done.stdout
        assert "vllm: skipped (vLLM is not installed" in (tmp_path / "bench_rollout.md").read_text()
    rows = {line["variant"]: {k: float(x) for k, x in line.items() if k != "variant"} for line in lines}
    assert all(math.isfinite(r["median_s"]) and r["median_s"] > 0 for r in rows.values())
    for v, r in rows.items():  # the derived columns are the measured ones' ratios, in the same table
        B, G, T = r["prompts"], r["group_size"], r["new_tokens"]
        assert r["tokens_per_s"] == pytest.approx(B * G * T / r["median_s"], rel=1e-12), v
        assert r["speed_vs_stock"] == pytest.approx(rows["stock"]["median_s"] / r["median_s"], rel=1e-12), v
        assert r["peak_vs_repeat"] == pytest.approx(r["peak_mib"] / rows["repeat"]["peak_mib"], rel=1e-12), v
    # K/V held at the end, from the shape: the last sampled token is never fed back, so T - 1 per sample
    shape = get_shape(bench_rollout.PRESETS["smoke"].shape)
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim * 4  # K and V, float32
    B, P, G, T = (int(rows["shared"][k]) for k in ("prompts", "prompt_len", "group_size", "new_tokens"))
    assert rows["shared"]["kv_mib"] * 2**20 == (B * P + B * G * (T - 1)) * per_token  # each prompt once
    for v in ("repeat", "stock"):
        assert rows[v]["kv_mib"] * 2**20 == B * G * (P + T - 1) * per_token, v  # each prompt G times
    assert (tmp_path / "bench_rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| shared |" in (tmp_path / "bench_rollout.md").read_text()


def test_multiturn_benchmark_forwards_the_tokens_its_table_counts_and_reports_ratios_of_its_own_medians(tmp_path):
    """bench_multiturn: each variant's forwarded tokens (counted at the embedding) are its row's; the tree forwards
    each prompt and each distinct turn once, flat each conversation once, per_turn every turn with its history; the
    FLOP limits are ratios of the rows' GFLOP and the speedups ratios of the medians in the same table."""
    import math

    from benchmarks import bench_multiturn

    p = bench_multiturn.PRESETS["smoke"]
    T, turns, G = p.assistant + p.observation, len(p.branching), math.prod(p.branching)
    distinct_turns = sum(math.prod(p.branching[:k + 1]) for k in range(turns))  # 2 + 4
    expected = {"tree": p.prompts * (p.prompt + distinct_turns * T), "flat": p.prompts * (p.prompt + G * turns * T),
                "standard": p.prompts * G * (p.prompt + turns * T),
                "per_turn": p.prompts * G * sum(p.prompt + t * T + p.assistant for t in range(turns))}
    _, model, variants = bench_multiturn.setup(p, threads=1)
    counted = {}
    for name, fn in variants.items():
        seen = []
        hook = model.model.embed_tokens.register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
        with torch.no_grad():
            fn(False)
        hook.remove()
        counted[name] = sum(seen)
    assert counted == expected
    rows = {r["variant"]: r for r in bench_multiturn.run("smoke", threads=1, memory=False)}
    assert {v: r["tokens"] for v, r in rows.items()} == expected
    ms = {v: r["median_ms"] for v, r in rows.items()}
    for v, r in rows.items():
        assert r["flop_limit"] == pytest.approx(rows["standard"]["gflop"] / r["gflop"], rel=1e-9), v
        assert r["x_flat"] == pytest.approx(ms["flat"] / ms[v], rel=1e-12), v
    assert rows["tree"]["flop_limit"] > rows["flat"]["flop_limit"] > rows["standard"]["flop_limit"]
    bench_multiturn.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert "| tree |" in (tmp_path / "multiturn_smoke.md").read_text()
