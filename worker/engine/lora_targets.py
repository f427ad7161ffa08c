"""The projections a LoRA adapter may target (torch-free: the operator validates specs with it too)."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
