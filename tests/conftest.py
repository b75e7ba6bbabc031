"""Shared test set-up: tests/ on sys.path, so `import fake_vllm` works however pytest imports files."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
