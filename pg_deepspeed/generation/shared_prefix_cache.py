"""A shared-prefix decode cache: each group's prompt K/V held once, each sample's generated K/V on its own.

GRPO samples G completions of one prompt. A repeated cache (`batch_repeat_interleave(G)`) holds G copies of the
prompt's K/V and reads all of them at every token. This cache holds, per layer,

| tensor                    | shape              | what                                                        |
|---------------------------|--------------------|-------------------------------------------------------------|
| `prompt_keys/values`      | `[B, Hkv, P, D]`   | group b's left-padded prompt, written once by the prefill    |
|                           |                    | (whole, or chunk by chunk into one allocation)               |
| `keys/values`             | `[N, Hkv, t, D]`   | sample n's own generated tokens (N = Σ G_b, a group's rows    |
|                           |                    | consecutive), grown by every decode step                     |

and a decode step's attention (`SharedPrefixCache.attend`) is two passes merged exactly by log-sum-exp
(`attention/merge.py`): the G·Hq/Hkv·s queries of a group against its shared prompt keys as one batched product
per KV head (pad keys masked out), and each sample's queries against its own generated keys (causal, bottom-right
aligned). With a = the prompt pass and b = the generated pass, O = e^(L_a−L)·O_a + e^(L_b−L)·O_b, L = logaddexp.

How it plugs into transformers (5.23 and 5.24): an attention module calls `cache.update(k, v, layer_idx, ...)`
and hands what it gets back to the attention function. During the prefill `update` stores the prompt's K/V and
returns the prompt written so far, and the model's own attention runs with the prompt mask; a prefill may come in
chunks of columns (`rollout.generate(prefill_chunk=...)`), each attending to the columns before it. After
`start_decoding()`, `update` stores the sample's new K/V and returns the sample's generated K/V only; the forward
must be given `shared_prefix=cache`, which the "prefix_grouper" attention function (`models/patch.py`) routes to
`attend`, where the group's prompt part is fetched by `module.layer_idx` and merged. So the model must be patched
(`patch_model`); `check_step()` after each decode forward raises if a layer attended without the cache (an unpatched
model would drop the prompt silently).

Served exactly: left-padded prompts of different lengths, groups of different G, GQA, the module's `scaling`,
attention sinks (`s_aux`). Refused by name: sliding or chunked windows that a prompt + completion would exceed
(the prompt is not re-windowed per sample), attention dropout, logit softcapping, layers whose keys do not come
from this cache's `update` (cross-layer KV sharing), empty prompts, positions other than the prompt's real length
plus the tokens generated so far.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from pg_deepspeed.attention.merge import add_sink, merge_attention
# the same accepted attention arguments as a packed call (none is dropped)
from pg_deepspeed.models.patch import ATTENTION_KWARGS
from pg_deepspeed.models.exactness import call_limits

class SharedPrefixLayer(DynamicLayer):
    """One layer: the prompt K/V `[B, Hkv, P, D]` (written by the prefill, whole or in chunks) and the samples'
    generated K/V `[N, Hkv, t, D]` (the inherited `keys`/`values`, grown by concatenation as in `DynamicLayer`).
    While prefilling, its sequence length is the prompt columns written so far (so transformers masks a chunk against
    them); once decoding, the samples' own tokens only: the prompt is held aside."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_keys: Tensor | None = None
        self.prompt_values: Tensor | None = None
        self.prompt_written = 0
        self.decoding = False

    def write_prompt(self, key_states: Tensor, value_states: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
        """A prefill chunk's K/V [B, Hkv, c, D] into the next c of the P prompt columns (allocated once, so a
        chunked prefill never copies what it wrote) -> the prompt K/V written so far [B, Hkv, written, D]."""
        if self.decoding:
            raise RuntimeError("the shared prompt is complete; decoding has started")
        start, end = self.prompt_written, self.prompt_written + key_states.shape[-2]
        if end > prompt_len:
            raise ValueError(f"the prefill wrote {end} prompt columns, more than the prompt_mask's {prompt_len}")
        if self.prompt_keys is None:
            B, H, _, D = key_states.shape
            self.prompt_keys = key_states.new_empty(B, H, prompt_len, D)
            self.prompt_values = value_states.new_empty(B, value_states.shape[1], prompt_len, value_states.shape[-1])
        self.prompt_keys[:, :, start:end] = key_states
        self.prompt_values[:, :, start:end] = value_states
        self.prompt_written = end
        return self.prompt_keys[:, :, :end], self.prompt_values[:, :, :end]

    def get_seq_length(self) -> int:
        return super().get_seq_length() if self.decoding else self.prompt_written

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("a SharedPrefixCache holds each prompt once; it cannot be repeated")

    def nbytes(self) -> int:
        tensors = (self.prompt_keys, self.prompt_values, self.keys, self.values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SharedPrefixCache(Cache):
    """A transformers `Cache` whose decode attention reads each group's prompt once (see the module docstring).

    prompt_mask: [B, P] left-padded (1 = real token), the mask the prefill is called with.
    group_sizes: G per prompt (an int for all, or B ints); the N = Σ G_b samples' rows are grouped consecutively.
    max_new_tokens: the longest completion to come, if known: a window check then refuses at the first decode step
        what a later step would exceed (else each step checks its own length).
    """

    def __init__(self, prompt_mask: Tensor, group_sizes: int | Sequence[int], max_new_tokens: int = 0) -> None:
        super().__init__(layer_class_to_replicate=SharedPrefixLayer)
        B, P = prompt_mask.shape
        sizes = [group_sizes] * B if isinstance(group_sizes, int) else [int(g) for g in group_sizes]
        if len(sizes) != B or min(sizes, default=1) < 1:
            raise ValueError(f"group_sizes must be one G >= 1 per prompt ({B} prompts), got {group_sizes!r}")
        lengths = prompt_mask.long().sum(1)
        if bool((lengths == 0).any()):
            raise ValueError(f"prompt {int((lengths == 0).nonzero()[0])} has no token (an all-zero prompt_mask row)")
        left = torch.arange(P, device=prompt_mask.device)[None] >= P - lengths[:, None]
        if not torch.equal(left, prompt_mask.bool()):
            raise ValueError("prompt_mask must be left-padded (every row's real tokens last)")
        self.prompt_mask = prompt_mask.bool()  # [B, P]
        self.prompt_lengths = lengths  # [B]
        self.group_sizes = sizes
        sizes_t = torch.tensor(sizes, device=prompt_mask.device)
        self.group_of = torch.repeat_interleave(torch.arange(B, device=prompt_mask.device), sizes_t)  # [N]
        starts = torch.cumsum(sizes_t, 0) - sizes_t
        self.slot_of = torch.arange(len(self.group_of), device=prompt_mask.device) - starts[self.group_of]  # [N]
        self.uniform = len(set(sizes)) == 1
        self.max_new_tokens = max_new_tokens
        self.decoding = False
        self._window: int | None | bool = False  # the smallest window of the model, read on the first attend
        self._attended: set[int] = set()
        self.peak_bytes = 0

    @property
    def num_samples(self) -> int:
        return len(self.group_of)

    # ------------------------------------------------------------------------------------------ the interface
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Prefill: store and return the prompt's K/V [B, Hkv, P, D]. Decode: append the samples' new K/V
        [N, Hkv, s, D] and return each sample's generated K/V [N, Hkv, t, D]."""
        while len(self.layers) <= layer_idx:
            self.layers.append(SharedPrefixLayer())
        layer = self.layers[layer_idx]
        if not self.decoding:
            if key_states.shape[0] != self.prompt_mask.shape[0]:
                raise ValueError(f"the prefill's keys {tuple(key_states.shape)} do not match the prompt_mask's "
                                 f"{self.prompt_mask.shape[0]} prompts")
            return layer.write_prompt(key_states, value_states, self.prompt_mask.shape[1])
        if key_states.shape[0] != self.num_samples:
            raise ValueError(f"a decode step through the shared cache takes its {self.num_samples} samples, "
                             f"got a batch of {key_states.shape[0]}")
        return layer.update(key_states, value_states)

    def start_decoding(self) -> None:
        """End of the prefill: from now on `update` stores the samples' own tokens."""
        P = self.prompt_mask.shape[1]
        unwritten = [i for i, layer in enumerate(self.layers) if layer.prompt_written != P]
        if not self.layers or unwritten:
            raise RuntimeError(f"start_decoding() before the prefill wrote all {P} prompt columns of every layer "
                               f"(layers {unwritten or 'none'} incomplete)")
        self.decoding = True
        for layer in self.layers:
            layer.decoding = True
        self._note_bytes()

    def check_step(self) -> None:
        """After a decode forward: every layer must have attended through `attend` (raises otherwise)."""
        missed = sorted(set(range(len(self.layers))) - self._attended)
        self._attended.clear()
        if missed:
            raise RuntimeError(
                f"layers {missed} did not attend through the shared-prefix cache: the model must be patched "
                "(pg_deepspeed.patch_model) and the forward given shared_prefix=<this cache>"
            )
        self._note_bytes()

    def nbytes(self) -> int:
        """Bytes of K/V this cache holds now (prompt once per group, plus every sample's generated tokens)."""
        return sum(layer.nbytes() for layer in self.layers)

    def _note_bytes(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise RuntimeError("a SharedPrefixCache holds each prompt once; it cannot be repeated")

    # ------------------------------------------------------------------------------------------ attention
    def attend(self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        """A decode step's attention. query: [N, Hq, s, D]; key, value: [N, Hkv, t, D] as `update` returned them
        (the s new tokens last) -> ([N, s, Hq, D], None). `attention_mask` is ignored: this cache defines it."""
        if not self.decoding:
            raise RuntimeError("shared_prefix= was passed to the prefill; pass it to the decode steps only")
        idx = getattr(module, "layer_idx", None)
        layer = self.layers[idx] if idx is not None and idx < len(self.layers) else None
        if layer is None or key is not layer.keys:
            raise ValueError(
                f"{type(module).__name__} (layer_idx={idx}) attends keys that this cache's update did not return "
                "(cross-layer KV sharing?); the shared-prefix cache cannot serve it"
            )
        self._check_call(module, query, key, kwargs)
        N, Hq, s, D = query.shape
        B, Hkv, P, _ = layer.prompt_keys.shape
        r, t = Hq // Hkv, key.shape[-2]
        scale = kwargs.get("scaling")
        scale = D ** -0.5 if scale is None else scale
        acc = torch.promote_types(query.dtype, torch.float32)

        # prompt pass: a group's G·r·s queries per KV head as one product over its P shared keys
        q = query.reshape(N, Hkv, r * s, D)
        qg = self._to_groups(q)  # [B, Hkv, Gmax·r·s, D]
        scores = torch.matmul(qg, layer.prompt_keys.transpose(-1, -2)).to(acc) * scale  # [B, Hkv, M, P]
        scores = scores.masked_fill(~self.prompt_mask[:, None, None, :], float("-inf"))
        lse_a = torch.logsumexp(scores, -1)  # [B, Hkv, M]
        out_a = torch.matmul(torch.exp(scores - lse_a[..., None]).to(query.dtype), layer.prompt_values)
        out_a, lse_a = self._from_groups(out_a), self._from_groups(lse_a[..., None])[..., 0]  # [N, Hkv, r·s, (D)]

        # generated pass: each sample's s queries over its own t keys, query i seeing key j when j <= i + t - s
        scores = torch.matmul(q, key.transpose(-1, -2)).to(acc) * scale  # [N, Hkv, r·s, t]
        visible = torch.arange(t, device=q.device)[None] <= torch.arange(s, device=q.device)[:, None] + (t - s)
        scores = scores.masked_fill(~visible.repeat(r, 1), float("-inf"))
        lse_b = torch.logsumexp(scores, -1)
        out_b = torch.matmul(torch.exp(scores - lse_b[..., None]).to(query.dtype), value)

        rows = lambda o: o.reshape(N, Hq, s, D).permute(0, 2, 1, 3).reshape(N * s, Hq, D)  # [N·s, Hq, D]
        lses = lambda l: l.reshape(N, Hq, s).permute(1, 0, 2).reshape(Hq, N * s)  # [Hq, N·s]
        out, lse = merge_attention(rows(out_a), lses(lse_a), rows(out_b), lses(lse_b))
        if kwargs.get("s_aux") is not None:
            out, lse = add_sink(out, lse, kwargs["s_aux"])
        self._attended.add(idx)
        return out.reshape(N, s, Hq, D).to(query.dtype), None

    def _to_groups(self, x: Tensor) -> Tensor:
        """[N, Hkv, m, D] sample rows -> [B, Hkv, Gmax·m, D], a group's samples side by side (zeros past its G)."""
        N, Hkv, m, D = x.shape
        B, G = len(self.group_sizes), max(self.group_sizes)
        if self.uniform:
            return x.reshape(B, G, Hkv, m, D).transpose(1, 2).reshape(B, Hkv, G * m, D)
        padded = x.new_zeros(B, G, Hkv, m, D)
        padded[self.group_of, self.slot_of] = x
        return padded.transpose(1, 2).reshape(B, Hkv, G * m, D)

    def _from_groups(self, x: Tensor) -> Tensor:
        """The inverse of `_to_groups`: [B, Hkv, Gmax·m, D] -> [N, Hkv, m, D]."""
        B, Hkv, M, D = x.shape
        G = max(self.group_sizes)
        x = x.reshape(B, Hkv, G, M // G, D).transpose(1, 2)  # [B, Gmax, Hkv, m, D]
        if self.uniform:
            return x.reshape(B * G, Hkv, M // G, D)
        return x[self.group_of, self.slot_of]

    def _check_call(self, module: torch.nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        name = type(module).__name__
        if kwargs.get("dropout", 0.0):
            raise ValueError(f"{name}: attention dropout ({kwargs['dropout']}) is not supported by the shared-prefix "
                             "cache (generate in eval mode)")
        if kwargs.get("softcap") is not None:
            raise ValueError(f"{name}: attention-logit softcapping is not supported by the shared-prefix cache")
        if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
            raise ValueError(f"{name} is not causal; the shared-prefix cache serves causal decoders only")
        unknown = sorted(k for k, v in kwargs.items() if k not in ATTENTION_KWARGS and v is not None)
        if unknown:
            raise ValueError(f"{name} passes attention arguments {unknown} that the shared-prefix cache does not "
                             "implement; refusing rather than dropping them")
        if query.shape[0] != self.num_samples or query.shape[1] % key.shape[1]:
            raise ValueError(f"{name}: query {tuple(query.shape)} does not fit the cache's {self.num_samples} samples "
                             f"and {key.shape[1]} KV heads")
        if self._window is False:
            self._window = call_limits(getattr(module, "config", None)).window
        windows = [w for w in (self._window, kwargs.get("sliding_window")) if w is not None]
        # the keys a query attends: its prompt and its generated tokens (the last sampled token is never fed)
        longest = int(self.prompt_lengths.max()) + max(key.shape[-2], self.max_new_tokens - 1)
        if windows and longest > min(windows):
            raise ValueError(
                f"a prompt + completion of {longest} attended tokens exceeds the model's attention window "
                f"({min(windows)}); "
                "the shared-prefix cache does not re-window the prompt: use the repeated cache or shorter sequences"
            )
        positions = kwargs.get("position_ids")
        if positions is not None and module.layer_idx == 0:
            s, t = query.shape[2], key.shape[-2]
            expected = (self.prompt_lengths[self.group_of] + (t - s))[:, None] + torch.arange(s, device=query.device)
            if positions.shape != expected.shape or not torch.equal(positions.to(expected.device), expected):
                raise ValueError("decode position_ids must continue each prompt's real length (prompt_mask.sum(1) + "
                                 "tokens generated so far): the shared-prefix cache places the prompt there")
