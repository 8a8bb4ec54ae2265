"""The KV cache's name (pg_deepspeed.models.transformers_compat) is the one this install's models declare and return."""
import inspect
import warnings

import pytest
import torch

from pg_deepspeed import patch_model
from pg_deepspeed.models.transformers_compat import CACHE_KWARG, returned_cache
from pg_deepspeed.generation.sampling import generate
from reference import TINY_FAMILIES, tiny_causal_lm


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_cache_name_is_a_declared_forward_argument_and_the_returned_field(family):
    model = tiny_causal_lm(family)
    for forward in (type(model).forward, type(model.model).forward):
        assert CACHE_KWARG in inspect.signature(forward).parameters
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert returned_cache(out) is not None and returned_cache(out).get_seq_length() == 3



def test_the_rollout_decodes_without_a_deprecated_cache_name():
    """On transformers >= 5.24 `past_key_values=` warns (FutureWarning) and goes away in 5.40; the rollout avoids it."""
    model = patch_model(tiny_causal_lm("qwen2"))
    prompts = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    for cache in ("shared", "repeat"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = generate(model, prompts, torch.ones_like(prompts), 2, max_new_tokens=3, temperature=1.0, top_p=1.0,
                           eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(0), cache=cache)
        assert out.completion_ids.shape == (4, 3)
