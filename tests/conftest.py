"""pytest setup shared by every test file: exact dense math and importable helpers."""

import sys
from pathlib import Path

import pytest
import torch

# The dense side of every comparison must be exact float32/float64 math.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

# `import helpers` from any test file, whatever pytest's import mode, and the examples'
# modules (their tests run the examples' core paths).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Leaves the thread count and the default dtype as each test found them."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
