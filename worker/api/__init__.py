"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics."""
