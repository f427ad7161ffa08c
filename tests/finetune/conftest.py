"""Fine-tuning tests: make the shared builders in finetune_helpers.py importable (importlib mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
