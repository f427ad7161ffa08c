"""LoRA fine-tuning on the serving model: token-level forward, split backward, adapter versions."""
