"""Model shapes for the benchmarks: random-weight Qwen2 configs, nothing downloaded.

| name | layers | hidden | heads (q/kv) | mlp   | vocab  | like                 |
|------|--------|--------|--------------|-------|--------|----------------------|
| tiny | 4      | 256    | 4 / 2        | 1024  | 32000  | the CPU preset       |
| 0.5b | 24     | 896    | 14 / 2       | 4864  | 151936 | Qwen2.5-0.5B         |
| 1.5b | 28     | 1536   | 12 / 2       | 8960  | 151936 | Qwen2.5-1.5B         |
| 7b   | 28     | 3584   | 28 / 4       | 18944 | 152064 | Qwen2.5-7B           |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a decoder's FLOPs and memory."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self):
        """A transformers `Qwen2Config` of this shape (eager attention until patched)."""
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=131072,
            tie_word_embeddings=self.tie_embeddings,
            use_cache=False,
        )

    def build(self, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> torch.nn.Module:
        """A randomly initialised `Qwen2ForCausalLM` of this shape, in `dtype` on `device`."""
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(self.config())
        return model.to(dtype)


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("tiny", layers=4, hidden=256, heads=4, kv_heads=2, intermediate=1024, vocab=32000,
                   tie_embeddings=False),
        ModelShape("0.5b", layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                   tie_embeddings=True),
        ModelShape("1.5b", layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                   tie_embeddings=True),
        ModelShape("7b", layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                   tie_embeddings=False),
    )
}


def get_shape(name: str) -> ModelShape:
    """The shape called `name`; raises ValueError naming the choices otherwise."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(SHAPES)}")
    return SHAPES[name]
