"""Edge Glass: multimodal alignment and instruction tuning on cached frozen-encoder features."""

from edge_glass.utils.runtime_env import apply_defaults as _apply_defaults

__version__ = "0.1.0"

# Before anything imports DeepSpeed: CPU accelerator without a GPU, a per-environment op cache.
_apply_defaults()
