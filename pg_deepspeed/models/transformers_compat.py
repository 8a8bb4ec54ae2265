"""transformers differences between our floor (setup.cfg) and newer releases, each decided in one place.

The KV cache's name. transformers 5.24 renamed the decoder forward's `past_key_values` argument and the
outputs' `past_key_values` field to `cache`; 5.24 still accepts the old name with a deprecation warning
and announces its removal for 5.40. Releases before 5.24 (our floor among them) know only
`past_key_values`. So a forward is called with `CACHE_KWARG`, the name this install's models declare,
and a packed call refuses a cache under any of `CACHE_NAMES`.
"""
from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_NAMES = ("cache", "past_key_values")
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward with `use_cache=True` returned (`output.cache` or `output.past_key_values`)."""
    return getattr(output, CACHE_KWARG)
