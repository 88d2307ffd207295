"""A pytest plugin for collecting, without a GPU, the tests a GPU run would select: torch reports
one CUDA device, so that the tests parametrized over the available devices (and the CUDA parity
tests, which skip without one) are collected as on the GPU machine. For --collect-only only:
a test that ran would fail at its first CUDA call.

    PYTHONPATH=scripts python -m pytest -p fake_cuda --collect-only -q tests -k cuda

scripts/gpu_check.sh does this in a dry run (GPU_CHECK_DRY_RUN=1) for the tests stage's
selection and the sanitizer's, so that a selection that errors or selects nothing shows at no
device time.
"""

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
