"""The GRPO algorithm, model-agnostic: advantages, loss, samplers, the training loop."""
