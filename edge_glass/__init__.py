"""Edge Glass: multimodal alignment and instruction tuning on cached frozen-encoder features."""

__version__ = "0.1.0"
