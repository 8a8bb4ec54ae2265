"""The KV cache's name (pg_deepspeed.compat) is the one this install's models declare and return."""
import inspect

import pytest
import torch

from pg_deepspeed.compat import CACHE_KWARG, returned_cache
from reference import TINY_FAMILIES, tiny_causal_lm


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_cache_name_is_a_declared_forward_argument_and_the_returned_field(family):
    model = tiny_causal_lm(family)
    for forward in (type(model).forward, type(model.model).forward):
        assert CACHE_KWARG in inspect.signature(forward).parameters
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert returned_cache(out) is not None and returned_cache(out).get_seq_length() == 3

