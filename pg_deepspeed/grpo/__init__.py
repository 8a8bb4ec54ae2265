"""GRPO training with prefix-grouped log-prob forwards: arguments, data, rollout, rewards, loss, the loop."""
