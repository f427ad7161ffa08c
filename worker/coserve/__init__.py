"""Co-serving: inference and fine-tuning in one engine loop under SLOs (FlexLLM §4)."""
