"""pg_deepspeed: prefix-grouped GRPO training, computing each prompt once instead of G times."""
from .attention import prefix_grouper_attention
from .layout import PrefixGroupLayout
from .tree import PrefixTreeLayout

__version__ = "0.1.0"
__all__ = [
    "PrefixGroupLayout", "PrefixTreeLayout", "prefix_grouper_attention", "patch_model", "completion_logprobs",
    "token_logprobs", "__version__",
]


def __getattr__(name: str):
    # the model layer imports transformers; load it only when asked for
    if name == "patch_model":
        from .patch import patch_model

        return patch_model
    if name in ("completion_logprobs", "token_logprobs"):
        from . import logprobs

        return getattr(logprobs, name)
    raise AttributeError(f"module 'pg_deepspeed' has no attribute {name!r}")
