"""pg_deepspeed: prefix-grouped GRPO training, computing each prompt once instead of G times."""
from pg_deepspeed.attention import prefix_grouper_attention
from pg_deepspeed.layouts.group import PrefixGroupLayout
from pg_deepspeed.layouts.tree import PrefixTreeLayout
from pg_deepspeed import _moved

_moved.install()

__version__ = "0.1.0"
__all__ = [
    "PrefixGroupLayout", "PrefixTreeLayout", "prefix_grouper_attention", "patch_model", "completion_logprobs",
    "token_logprobs", "__version__",
]


def __getattr__(name: str):
    # the model layer imports transformers; load it only when asked for
    if name == "patch_model":
        from pg_deepspeed.models.patch import patch_model

        return patch_model
    if name in ("completion_logprobs", "token_logprobs"):
        from pg_deepspeed.models import logprobs

        return getattr(logprobs, name)
    raise AttributeError(f"module 'pg_deepspeed' has no attribute {name!r}")
