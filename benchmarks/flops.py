"""The FLOP limit of prefix grouping: baseline FLOPs over grouped FLOPs.

Counted per decoder layer, forward:
  linear  2 * (h*Hq*D + 2*h*Hkv*D + Hq*D*h + 3*h*I)  per token (q, k, v, o, SwiGLU MLP)
  attn    4 * Hq * D                                   per attended (query, key) pair (QKᵀ and PV)
and once, 2 * h * V per completion token for the LM head (identical in both paths).
Backward is counted as twice the forward for every term, so fwd+bwd = 3x forward; a
uniform factor cancels in the ratio. Norms, RoPE, softmax and the embedding lookup are
left out (they are O(h) per token, small against the O(h^2) linears).

One group: prompt P, G completions of S tokens.
  baseline  G sequences [prompt ; completion_i]: G*(P+S) tokens, G * (P+S)(P+S+1)/2 causal pairs
  grouped   [prompt | completion_1 | ... | completion_G]: P + G*S tokens,
            P(P+1)/2 + G * (S*P + S(S+1)/2) pairs
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import ModelShape


def _check_psg(P: int, S: int, G: int) -> None:
    for name, x in (("P", P), ("S", S), ("G", G)):
        if not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")


def token_ratio(P: int, S: int, G: int) -> float:
    """Tokens computed by the baseline over the grouped path: G(P+S) / (P+GS)."""
    _check_psg(P, S, G)
    return G * (P + S) / (P + G * S)


def attention_pair_ratio(P: int, S: int, G: int) -> float:
    """Attended pairs, continuum form (L²/2 per causal sequence): G(P+S)² / (P² + GS(2P+S))."""
    _check_psg(P, S, G)
    return G * (P + S) ** 2 / (P**2 + G * S * (2 * P + S))


def attention_pairs(P: int, S: int, G: int, *, grouped: bool) -> int:
    """Exact causal (query, key) pairs, diagonal included, for one group."""
    _check_psg(P, S, G)
    if grouped:
        return P * (P + 1) // 2 + G * (S * P + S * (S + 1) // 2)
    return G * ((P + S) * (P + S + 1) // 2)


@dataclass(frozen=True)
class FlopCount:
    """Forward+backward FLOPs of one group's completion log-prob pass."""

    linear: float
    attention: float
    lm_head: float

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lm_head


def linear_flops_per_token(shape: ModelShape) -> int:
    """Forward FLOPs of all decoder linears for one token (LM head excluded)."""
    h, D, I = shape.hidden, shape.head_dim, shape.intermediate
    per_layer = h * shape.heads * D + 2 * h * shape.kv_heads * D + shape.heads * D * h + 3 * h * I
    return 2 * per_layer * shape.layers


def attention_flops_per_pair(shape: ModelShape) -> int:
    """Forward FLOPs for one (query, key) pair across all layers and heads."""
    return 4 * shape.heads * shape.head_dim * shape.layers


def flop_count(shape: ModelShape, P: int, S: int, G: int, *, grouped: bool) -> FlopCount:
    """Forward+backward FLOPs (3x forward) of one group, baseline or grouped."""
    tokens = P + G * S if grouped else G * (P + S)
    pairs = attention_pairs(P, S, G, grouped=grouped)
    return FlopCount(
        linear=3.0 * tokens * linear_flops_per_token(shape),
        attention=3.0 * pairs * attention_flops_per_pair(shape),
        lm_head=3.0 * G * S * 2 * shape.hidden * shape.vocab,
    )


def flop_limit(shape: ModelShape, P: int, S: int, G: int) -> float:
    """The largest speedup prefix grouping can give: baseline FLOPs / grouped FLOPs."""
    return flop_count(shape, P, S, G, grouped=False).total / flop_count(shape, P, S, G, grouped=True).total


def forest_work(parents: list[int], lengths: list[int]) -> tuple[int, int]:
    """(tokens, exact attended pairs) of a packed forest: each segment causally over itself, fully over every
    ancestor (a two-level group and the standard forward are forests too)."""
    before = [0] * len(parents)  # tokens on the path above each segment
    pairs = 0
    for s, (p, n) in enumerate(zip(parents, lengths)):
        before[s] = 0 if p < 0 else before[p] + lengths[p]
        pairs += n * before[s] + n * (n + 1) // 2
    return sum(lengths), pairs


def forest_flops(shape: ModelShape, parents: list[int], lengths: list[int], predicted_tokens: int) -> FlopCount:
    """Forward+backward FLOPs (3x forward) of a log-prob pass over a packed forest, the LM head on
    `predicted_tokens` rows."""
    tokens, pairs = forest_work(parents, lengths)
    return FlopCount(
        linear=3.0 * tokens * linear_flops_per_token(shape),
        attention=3.0 * pairs * attention_flops_per_pair(shape),
        lm_head=3.0 * predicted_tokens * 2 * shape.hidden * shape.vocab,
    )
