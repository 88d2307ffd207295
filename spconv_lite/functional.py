"""Functions on whole sparse tensors (spconv's ``spconv.pytorch.functional`` user API)."""

from __future__ import annotations

import functools

import torch

from .tensor import SparseConvTensor, check_sites, site_ids


def sparse_add(*tensors: SparseConvTensor) -> SparseConvTensor:
    """Sum of sparse tensors whose sites may differ: the result lives on the union of their
    sites, and a site's features are the sum over the tensors that have it.

    When the union equals the sites of one operand (for example adding a tensor to a subset
    of itself), the result keeps that operand's row order and its ``indice_dict``, so later
    layers can still reuse its kernel maps. Otherwise rows are sorted by (batch, z, y, x) and
    ``indice_dict`` starts empty, as in spconv.

    Which of the two happens depends on the sites, so ``torch.compile`` ends its graph here
    (and runs this in Python); ``fullgraph=True`` and ``torch.export`` cannot trace it. Tensors
    on the same sites in the same row order add with ``x + y`` or ``AddTable``, which trace.

    Args:
        *tensors: at least one ``SparseConvTensor``, all with the same ``spatial_shape``,
            ``batch_size`` and channel count.

    Example:
        >>> sites = torch.tensor([[0, 1], [0, 3]], dtype=torch.int32)  # (batch, x), 1-D grid
        >>> a = SparseConvTensor(torch.ones(1, 2), sites[:1], [4], batch_size=1)
        >>> b = SparseConvTensor(torch.ones(2, 2), sites, [4], batch_size=1)
        >>> sparse_add(a, b).features.tolist()
        [[2.0, 2.0], [1.0, 1.0]]
    """
    if not tensors:
        raise ValueError("sparse_add needs at least one SparseConvTensor")
    first = tensors[0]
    for i, x in enumerate(tensors):
        if not isinstance(x, SparseConvTensor):
            raise TypeError(
                f"sparse_add argument {i} is {type(x).__name__}, not a SparseConvTensor"
            )
        x.check_rows()
        if (x.spatial_shape != first.spatial_shape or x.batch_size != first.batch_size
                or x.features.shape[1] != first.features.shape[1]):
            raise ValueError(
                f"sparse_add argument {i} has spatial_shape {x.spatial_shape}, batch_size "
                f"{x.batch_size}, {x.features.shape[1]} channels; argument 0 has "
                f"{first.spatial_shape}, {first.batch_size}, {first.features.shape[1]}"
            )
        # Duplicate or out-of-grid sites would merge with other sites' sums silently.
        check_sites(x.indices, x.spatial_shape, x.batch_size)
    indices = torch.cat([x.indices for x in tensors])
    # The union of sites in (batch, z, y, x) order: a 1-D unique over one id per row.
    ids, row_of = torch.unique(site_ids(indices, first.spatial_shape, first.batch_size),
                               return_inverse=True)
    sites = indices.new_empty(ids.shape[0], indices.shape[1]).index_put_((row_of,), indices)
    dtype = functools.reduce(torch.promote_types, [x.features.dtype for x in tensors])
    summed = first.features.new_zeros(ids.shape[0], first.features.shape[1], dtype=dtype)
    rows = row_of.split([x.indices.shape[0] for x in tensors])
    # One operand at a time, in argument order: each adds once to a row, so the sums do not
    # depend on the order of a GPU's atomic adds.
    for x, x_rows in zip(tensors, rows):
        summed = summed.index_add(0, x_rows, x.features.to(dtype))
    for x, x_rows in zip(tensors, rows):
        if x_rows.shape[0] == ids.shape[0]:
            # This operand already holds every site: return its rows in its own order.
            return x.replace_feature(summed[x_rows])
    return SparseConvTensor(summed, sites, first.spatial_shape, first.batch_size)
