"""Integrations with other trainers, imported only by their users (nothing in pg_deepspeed imports them).

- `pg_deepspeed.integrations.trl.PrefixGroupedGRPOTrainer`: TRL's GRPOTrainer with every log-prob pass prefix-grouped
  (`pip install 'pg_deepspeed[trl]'`).
"""
