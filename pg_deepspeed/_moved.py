"""Import paths of the flat layout before 0.2 (one release of grace): `import pg_deepspeed.patch` still works, warns
once with the new path, and returns the same module object as `pg_deepspeed.models.patch`."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "pg_deepspeed.plan": "pg_deepspeed.layouts.attention_plan",
    "pg_deepspeed.layout": "pg_deepspeed.layouts.group",
    "pg_deepspeed.tree": "pg_deepspeed.layouts.tree",
    "pg_deepspeed.packing": "pg_deepspeed.layouts.packing",
    "pg_deepspeed.attention.cpu": "pg_deepspeed.attention.backends.cpu",
    "pg_deepspeed.attention.flash": "pg_deepspeed.attention.backends.flash",
    "pg_deepspeed.attention.flash3": "pg_deepspeed.attention.backends.flash3",
    "pg_deepspeed.attention.torch_cuda": "pg_deepspeed.attention.backends.torch_cuda",
    "pg_deepspeed.patch": "pg_deepspeed.models.patch",
    "pg_deepspeed.support": "pg_deepspeed.models.exactness",
    "pg_deepspeed.compat": "pg_deepspeed.models.transformers_compat",
    "pg_deepspeed.logprobs": "pg_deepspeed.models.logprobs",
    "pg_deepspeed.sharding": "pg_deepspeed.models.sequence_shards",
    "pg_deepspeed.cache": "pg_deepspeed.generation.shared_prefix_cache",
    "pg_deepspeed.grpo.rollout": "pg_deepspeed.generation.sampling",
    "pg_deepspeed.grpo.collective": "pg_deepspeed.collectives",
    "pg_deepspeed.sequence_parallel": "pg_deepspeed.distributed.sequence_parallel",
    "pg_deepspeed.gather": "pg_deepspeed.distributed.rollout_weights",
    "pg_deepspeed.build": "pg_deepspeed.distributed.engines",
    "pg_deepspeed.ds_config": "pg_deepspeed.distributed.ds_config",
    "pg_deepspeed.checkpoint": "pg_deepspeed.distributed.checkpoint",
    "pg_deepspeed.export": "pg_deepspeed.distributed.export",
    "pg_deepspeed.peak_memory": "pg_deepspeed.distributed.peak_memory",
    "pg_deepspeed.presets": "pg_deepspeed.demo.presets",
    "pg_deepspeed.tokenizer": "pg_deepspeed.demo.char_tokenizer",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name, imports its new home and registers that module under the old name too."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", FutureWarning,
                      stacklevel=3)
        module = importlib.import_module(new)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):  # the new module is already executed
        pass


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
