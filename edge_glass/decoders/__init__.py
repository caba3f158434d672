"""Language decoders: Qwen (with LoRA) and the Tiny Recursive Model."""
