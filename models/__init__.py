"""Everything specific to Qwen2.5-VL: loading, processor, batches, log-probs, the tiny model."""

import models.cpu_compat  # noqa: F401  (first: lets torchvision import beside CPU torch)
