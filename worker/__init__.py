"""FlexLLM."""
