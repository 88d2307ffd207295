"""Case tables of the dense comparisons, shared by test_reference.py (the pure-PyTorch reference
against dense PyTorch) and test_dense_parity.py (the fast path against dense PyTorch).

Together the cases cover kernel 1/2/3/5, stride 1..3, padding 0..2, dilation 1/2, batch 1..3,
channels 1..64, per-dimension tuples, and 1D/2D/3D (4D where torch has a dense counterpart).
"""

from __future__ import annotations

import pytest
from helpers import case_id

# (batch, c_in, c_out, spatial_shape, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 1, 1, (9,), 3, 1, 0, 1),
    (1, 1, 1, (11,), 3, 1, 0, 1),
    (2, 3, 4, (9,), 5, 2, 2, 1),
    (2, 3, 4, (10,), 5, 2, 2, 1),
    (3, 2, 3, (8,), 2, 3, 1, 2),
    (3, 2, 3, (9,), 2, 3, 1, 2),
    (1, 4, 2, (7,), 1, 2, 0, 1),
    (2, 1, 2, (8,), 1, 1, 2, 1),  # padding with a 1-kernel: outputs on the border
    (1, 2, 3, (7, 8), 3, 2, 1, 1),
    (2, 3, 2, (8, 7), (3, 2), (1, 2), (0, 1), (2, 1)),
    (2, 1, 5, (9, 9), 5, 1, 2, 1),
    (3, 4, 4, (6, 9), 2, 2, 0, 1),
    (1, 3, 3, (9, 8), (5, 1), (3, 1), (2, 0), (1, 2)),
    (2, 2, 2, (7, 7), 3, 3, 2, 2),
    (1, 1, 1, (5, 6, 7), 3, 1, 1, 1),
    (2, 3, 4, (7, 7, 7), 3, 2, 1, 1),
    (2, 4, 3, (6, 7, 8), 2, 2, 0, 1),
    (3, 2, 2, (5, 5, 5), 1, 1, 0, 1),
    (1, 3, 5, (8, 7, 6), (3, 1, 2), (2, 1, 3), (1, 0, 2), (1, 2, 1)),
    (2, 2, 3, (9, 8, 7), 5, 2, 2, 1),
    (1, 2, 2, (9, 9, 9), 3, 3, 2, 2),
    (2, 5, 3, (7, 6, 5), (2, 3, 3), 1, (0, 1, 2), (2, 2, 1)),
    (3, 3, 2, (6, 6, 6), (5, 2, 1), (1, 3, 2), (2, 1, 0), (1, 1, 2)),
    (1, 2, 2, (4, 3, 5), 5, 1, 0, 1),  # output shape < 1: skipped
    (1, 64, 32, (5, 5, 5), 3, 2, 1, 1),
    (2, 16, 64, (6, 6, 6), 3, 1, 0, 1),
    (2, 2, 3, (4, 5, 4, 5), 3, (1, 2, 1, 2), 1, 1),
    (1, 3, 2, (5, 4, 4, 4), (2, 3, 1, 3), 2, (0, 1, 0, 1), (2, 1, 1, 1)),
]

# (batch, c_in, c_out, spatial_shape, kernel, dilation); submanifold kernels are odd.
SUBM_CASES = [
    (1, 1, 1, (9,), 3, 1),
    (1, 1, 1, (11,), 3, 1),
    (2, 3, 2, (9,), 5, 2),
    (3, 2, 2, (8,), 1, 1),
    (2, 2, 3, (8, 7), 3, 1),
    (3, 3, 3, (9, 9), (5, 3), (1, 2)),
    (1, 4, 2, (7, 8), 1, 1),
    (2, 2, 4, (6, 7, 8), 3, 1),
    (1, 3, 2, (7, 7, 7), 3, 2),
    (2, 2, 2, (8, 7, 6), (1, 3, 5), (1, 2, 1)),
    (1, 2, 3, (6, 6, 6), 5, 1),
    (1, 64, 48, (5, 5, 5), 3, 1),
    (2, 2, 3, (4, 4, 5, 4), 3, (1, 1, 2, 1)),
    # kernels reaching past a thin grid (late encoder stages, BEV-as-3D [1, H, W] grids)
    (1, 2, 3, (1, 6, 6), 5, 1),
    (2, 2, 2, (2, 6, 5), 7, 1),
    (1, 3, 2, (1, 5, 6), 3, (2, 1, 1)),
]

# (batch, c_in, c_out, spatial_shape, kernel, stride, padding, dilation, output_padding)
TRANSPOSE_CASES = [
    (1, 2, 3, (5,), 3, 2, 1, 1, 1),
    (2, 1, 2, (6,), 2, 3, 0, 1, 2),
    (3, 3, 1, (5,), 1, 1, 0, 1, 0),
    (2, 3, 4, (4, 5, 4), 1, 1, 0, 1, 0),  # 1x1: the weight's memory is a [C_in, C_out] matrix
    (1, 2, 3, (4, 5, 4), 1, 1, 0, 2, 1),  # 1x1 whose output padding grows the grid
    (1, 3, 2, (5, 4), 3, 1, 0, 1, 0),
    (2, 2, 2, (4, 5), (3, 2), (2, 1), (1, 0), (1, 2), (1, 1)),
    (3, 2, 3, (4, 4), 5, 2, 2, 1, 0),
    (1, 2, 2, (4, 3, 5), 3, 2, 1, 1, 1),
    (2, 3, 2, (3, 4, 3), 2, 2, 0, 1, 0),
    (1, 2, 3, (4, 4, 4), (1, 3, 2), (3, 1, 2), (0, 1, 1), (1, 2, 2), (2, 0, 1)),
    (2, 1, 1, (3, 3, 3), 5, 3, 2, 2, 1),
    (1, 32, 16, (4, 4, 4), 3, 2, 1, 1, 1),
]

# (batch, c_in, c_out, conv input spatial_shape, kernel, stride, padding, dilation)
INVERSE_CASES = [
    (1, 2, 3, (9,), 3, 2, 1, 1),
    (3, 1, 2, (10,), 5, 3, 2, 2),
    (2, 3, 2, (8, 9), 2, 2, 0, 1),
    (1, 2, 2, (9, 8), (3, 5), (3, 2), (2, 1), (1, 2)),
    (2, 3, 4, (7, 7, 7), 3, 2, 1, 1),
    (1, 2, 2, (8, 7, 9), (2, 3, 1), (2, 3, 1), (0, 2, 0), (2, 1, 1)),
    (2, 1, 2, (6, 6, 6), 5, 1, 2, 1),
    (1, 16, 32, (6, 6, 6), 3, 2, 1, 1),
    (2, 3, 2, (6, 7, 6), 1, 2, 0, 1),  # the inverse of a strided 1-kernel conv is 1x1
]

# Inverse conv keyed on a max pool, through the modules' indice keys (fast path only).
# (batch, c_in, c_out, spatial_shape, pool kernel)
POOL_INVERSE_CASES = [
    (2, 3, 2, (8, 9), 2),
    (1, 4, 3, (7, 7, 6), (2, 3, 2)),
]

# (batch, channels, spatial_shape, kernel, stride or None, padding, dilation)
POOL_CASES = [
    (2, 3, (9,), 2, None, 0, 1),
    (1, 2, (9,), 3, 2, 1, 2),
    (3, 1, (8,), 1, 3, 0, 1),
    (2, 2, (8, 7), 3, 2, 1, 1),
    (3, 1, (9, 9), (2, 3), (2, 1), (0, 1), (1, 2)),
    (1, 4, (7, 8), 5, 3, 2, 1),
    (2, 3, (6, 7, 8), 2, None, 0, 1),
    (1, 2, (7, 7, 7), 3, 2, 1, 1),
    (2, 2, (8, 7, 6), (3, 1, 2), (1, 2, 3), (1, 0, 2), (2, 1, 1)),
    (3, 5, (6, 6, 6), 3, 1, 1, 2),
    (1, 64, (5, 5, 5), 3, 1, 1, 1),
]
# Average pooling only, and only for the reference: torch has no max_pool4d, and spconv_lite
# has no SparseAvgPool4d.
POOL_CASES_4D = [(2, 2, (4, 5, 4, 4), (2, 3, 1, 2), (2, 1, 1, 2), (0, 1, 0, 1), 1)]

# (batch, channels, spatial_shape, batch item left without sites or None)
GLOBAL_CASES = [
    (1, 3, (9,), None),
    (3, 2, (7, 8), 1),
    (2, 5, (5, 6, 7), None),
    (3, 64, (4, 4, 4), 2),
]

# The table of every op that both test files compare with dense torch.
DENSE_CASES = {
    "conv": CONV_CASES,
    "subm": SUBM_CASES,
    "transpose": TRANSPOSE_CASES,
    "inverse": INVERSE_CASES,
    "max_pool": POOL_CASES,
    "avg_pool": POOL_CASES,
    "global_max": GLOBAL_CASES,
    "global_avg": GLOBAL_CASES,
}


def op_cases(tables: dict[str, list]) -> list:
    """``(op, case)`` pytest parameters of every case of every op's table, with ids
    ``op-case``."""
    return [pytest.param(op, case, id=f"{op}-{case_id(case)}")
            for op, cases in tables.items() for case in cases]
