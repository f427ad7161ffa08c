"""Redis queues: inference requests and outputs, FinetuneJob intake and progress (layout: worker/protocol.py)."""
