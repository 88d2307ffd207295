"""Pure-PyTorch reference ("oracle") of every spconv_lite op.

This module is the ground truth the fast C++ ops are tested against. It is deliberately slow
and obvious: neighbour pairs are built with Python dicts keyed by ``(batch, *coords)`` tuples
and loops over sites and kernel offsets (all in :func:`kernel_pairs`), and the feature math
uses plain torch ops so autograd reaches features, weight and bias. Standalone: torch only.

Conventions (see the team spec): ``indices`` is ``[N, D+1]`` (batch first), weights are in
spconv layout ``[C_out, *kernel_size, C_in]``, kernel offsets are enumerated row-major, and
output sites of non-submanifold ops are sorted by ``(batch, coord0, coord1, ...)``. A 1x1
layer (kernel volume 1, and submanifold, inverse or stride 1) reads its weight as spconv 2.x
does: the memory of the ``[C_out, 1, ..., 1, C_in]`` tensor viewed as a ``[C_in, C_out]`` matrix.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

IntOrSeq = Union[int, Sequence[int]]
Pair = tuple[int, int, int]  # (in_row, out_row, kernel offset index)


def _tuple(value: IntOrSeq, ndim: int) -> tuple[int, ...]:
    """Expands an int to ``ndim`` copies, or checks a sequence has ``ndim`` entries."""
    if isinstance(value, int):
        return (value,) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"expected {ndim} values, got {out}")
    return out


def kernel_offsets(kernel_size: IntOrSeq) -> list[tuple[int, ...]]:
    """Returns all kernel offsets in row-major order (last dimension fastest)."""
    sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    return list(itertools.product(*(range(int(k)) for k in sizes)))


def conv_output_shape(spatial_shape: Sequence[int], kernel_size: IntOrSeq, stride: IntOrSeq,
                      padding: IntOrSeq, dilation: IntOrSeq) -> list[int]:
    """Output spatial shape of a regular (strided) convolution, as in torch."""
    ndim = len(spatial_shape)
    ks, st, pd, dl = (_tuple(v, ndim) for v in (kernel_size, stride, padding, dilation))
    return [(int(n) + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(spatial_shape, ks, st, pd, dl)]


def conv_transpose_output_shape(spatial_shape: Sequence[int], kernel_size: IntOrSeq,
                                stride: IntOrSeq, padding: IntOrSeq, dilation: IntOrSeq,
                                output_padding: IntOrSeq) -> list[int]:
    """Output spatial shape of a transposed convolution, as in torch."""
    ndim = len(spatial_shape)
    ks, st, pd, dl, op = (_tuple(v, ndim)
                          for v in (kernel_size, stride, padding, dilation, output_padding))
    return [(int(n) - 1) * s - 2 * p + d * (k - 1) + 1 + o
            for n, k, s, p, d, o in zip(spatial_shape, ks, st, pd, dl, op)]


def kernel_pairs(indices: Tensor, out_spatial_shape: Sequence[int], kernel_size: IntOrSeq,
                 stride: IntOrSeq, padding: IntOrSeq, dilation: IntOrSeq,
                 mode: str) -> tuple[Tensor, list[Pair]]:
    """Builds the (in_row, out_row, k) pairs of a convolution: the single home of pair logic.

    Args:
        indices: ``[N, D+1]`` integer input sites (batch first).
        out_spatial_shape: output spatial shape (ignored for ``"subm"``).
        kernel_size, stride, padding, dilation: ints or D-tuples (stride/padding ignored
            for ``"subm"``).
        mode: ``"subm"`` (outputs = inputs, centred kernel), ``"conv"`` (input x reaches output
            o iff ``o*s - p + k*d == x``) or ``"transpose"`` (``y == x*s - p + k*d``).

    Returns:
        ``(out_indices int32 [N_out, D+1], pairs)``; for ``"conv"``/``"transpose"`` the output
        sites are every in-bounds site reached by an input, sorted by (batch, coords).
    """
    ndim = indices.shape[1] - 1
    ks, st, pd, dl = (_tuple(v, ndim) for v in (kernel_size, stride, padding, dilation))
    offsets = kernel_offsets(ks)
    sites = [tuple(site) for site in indices.tolist()]

    if mode == "subm":
        row_of = {site: row for row, site in enumerate(sites)}
        pairs = []
        for out_row, (b, *coord) in enumerate(sites):
            for k, off in enumerate(offsets):
                # Neighbour through offset k, with the kernel centred on the output site.
                nb = (b, *(c + (o - (kk - 1) // 2) * d for c, o, kk, d in zip(coord, off, ks, dl)))
                if nb in row_of:
                    pairs.append((row_of[nb], out_row, k))
        return indices.to(torch.int32, copy=True).contiguous(), pairs

    if mode not in ("conv", "transpose"):
        raise ValueError(f"mode must be 'subm', 'conv' or 'transpose', got {mode!r}")
    bounds = [int(n) for n in out_spatial_shape]
    raw = []  # (in_row, out_site, k): output rows are only known once all sites are seen
    for in_row, (b, *coord) in enumerate(sites):
        for k, off in enumerate(offsets):
            out = []
            for x, o, s, p, d, n in zip(coord, off, st, pd, dl, bounds):
                if mode == "conv":
                    num = x + p - o * d  # solve o_site*s - p + o*d == x
                    if num % s:
                        break
                    y = num // s
                else:
                    y = x * s - p + o * d
                if not 0 <= y < n:
                    break
                out.append(y)
            else:
                raw.append((in_row, (b, *out), k))
    out_sites = sorted({site for _, site, _ in raw})
    out_row_of = {site: row for row, site in enumerate(out_sites)}
    pairs = [(in_row, out_row_of[site], k) for in_row, site, k in raw]
    out_indices = torch.tensor(out_sites, dtype=torch.int32).reshape(len(out_sites), ndim + 1)
    return out_indices.to(indices.device), pairs


def _apply_pairs(features: Tensor, weight: Tensor, pairs: list[Pair], n_out: int,
                 bias: Optional[Tensor], conv1x1: bool = False) -> Tensor:
    """out[o] = sum over pairs (i, o, k) of features[i] @ W[:, k, :].T (+ bias); for a 1x1
    layer out[o] = features[i] @ W.reshape(C_in, C_out) (+ bias), as spconv 2.x computes it."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    if conv1x1:
        matrices = weight.reshape(1, c_in, c_out)  # [K=1, C_in, C_out]: a reshape, no transpose
    else:
        matrices = weight.reshape(c_out, -1, c_in).permute(1, 2, 0)  # [K, C_in, C_out]
    by_k: dict[int, tuple[list[int], list[int]]] = {}
    for i, o, k in pairs:
        ins, outs = by_k.setdefault(k, ([], []))
        ins.append(i)
        outs.append(o)
    out = features.new_zeros((n_out, c_out))
    for k, (ins, outs) in by_k.items():
        src = features.index_select(0, _rows(ins, features)) @ matrices[k]
        out = out.index_add(0, _rows(outs, features), src)
    return out if bias is None else out + bias


def _rows(rows: list[int], like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=torch.long, device=like.device)


def _kernel_size(weight: Tensor) -> tuple[int, ...]:
    return tuple(weight.shape[1:-1])


def _is_1x1(kernel_size: Sequence[int], stride: IntOrSeq = 1) -> bool:
    """Whether spconv 2.x runs the layer as one matrix product: kernel volume 1 and no stride."""
    return all(k == 1 for k in kernel_size) and all(
        s == 1 for s in _tuple(stride, len(kernel_size)))


def subm_conv(features: Tensor, indices: Tensor, spatial_shape: Sequence[int], weight: Tensor,
              dilation: IntOrSeq = 1, bias: Optional[Tensor] = None) -> Tensor:
    """Submanifold conv: output rows are the input rows (same order)."""
    _, pairs = kernel_pairs(indices, spatial_shape, _kernel_size(weight), 1, 0, dilation, "subm")
    return _apply_pairs(features, weight, pairs, indices.shape[0], bias,
                        _is_1x1(_kernel_size(weight)))


def sparse_conv(features: Tensor, indices: Tensor, spatial_shape: Sequence[int], batch_size: int,
                weight: Tensor, stride: IntOrSeq = 1, padding: IntOrSeq = 0,
                dilation: IntOrSeq = 1, bias: Optional[Tensor] = None
                ) -> tuple[Tensor, Tensor, list[int]]:
    """Regular sparse conv; returns (out_features, out_indices, out_spatial_shape)."""
    ks = _kernel_size(weight)
    out_shape = conv_output_shape(spatial_shape, ks, stride, padding, dilation)
    out_indices, pairs = kernel_pairs(indices, out_shape, ks, stride, padding, dilation, "conv")
    out = _apply_pairs(features, weight, pairs, len(out_indices), bias, _is_1x1(ks, stride))
    return out, out_indices, out_shape


def sparse_conv_transpose(features: Tensor, indices: Tensor, spatial_shape: Sequence[int],
                          batch_size: int, weight: Tensor, stride: IntOrSeq = 1,
                          padding: IntOrSeq = 0, dilation: IntOrSeq = 1,
                          output_padding: IntOrSeq = 0, bias: Optional[Tensor] = None
                          ) -> tuple[Tensor, Tensor, list[int]]:
    """Transposed sparse conv (like F.conv_transpose); returns features, indices, shape."""
    ks = _kernel_size(weight)
    out_shape = conv_transpose_output_shape(spatial_shape, ks, stride, padding, dilation,
                                            output_padding)
    out_indices, pairs = kernel_pairs(indices, out_shape, ks, stride, padding, dilation,
                                      "transpose")
    out = _apply_pairs(features, weight, pairs, len(out_indices), bias, _is_1x1(ks, stride))
    return out, out_indices, out_shape


def sparse_inverse_conv(features: Tensor, indices: Tensor, spatial_shape: Sequence[int],
                        batch_size: int, weight: Tensor, conv_input_indices: Tensor,
                        conv_input_spatial_shape: Sequence[int], stride: IntOrSeq,
                        padding: IntOrSeq, dilation: IntOrSeq,
                        bias: Optional[Tensor] = None) -> Tensor:
    """Inverse of a strided conv: features on its output sites -> rows of its input sites.

    ``features``/``indices`` live on the strided conv's output sites (any row order; sites
    missing from ``indices`` count as zero). The conv's pairs (x, o, k) are rebuilt from
    ``conv_input_indices`` and reversed: ``out[x] += features[o] @ weight[:, k, :].T``.
    """
    ks = _kernel_size(weight)
    conv_shape = conv_output_shape(conv_input_spatial_shape, ks, stride, padding, dilation)
    conv_out, pairs = kernel_pairs(conv_input_indices, conv_shape, ks, stride, padding,
                                   dilation, "conv")
    # Map the conv's sorted output sites onto the rows of the given `indices`.
    row_of = {tuple(site): row for row, site in enumerate(indices.tolist())}
    feature_row = [row_of.get(tuple(site)) for site in conv_out.tolist()]
    reversed_pairs = [(feature_row[o], x, k) for x, o, k in pairs if feature_row[o] is not None]
    # The inverse layer itself has no stride: with a kernel of volume 1 it is a 1x1 layer.
    return _apply_pairs(features, weight, reversed_pairs, conv_input_indices.shape[0], bias,
                        _is_1x1(ks))


def _pool_pairs(indices: Tensor, spatial_shape: Sequence[int], kernel_size: IntOrSeq,
                stride: Optional[IntOrSeq], padding: IntOrSeq, dilation: IntOrSeq):
    """Pairs of a pooling window as (out_indices, out_shape, in_rows, out_rows)."""
    stride = kernel_size if stride is None else stride
    out_shape = conv_output_shape(spatial_shape, kernel_size, stride, padding, dilation)
    out_indices, pairs = kernel_pairs(indices, out_shape, kernel_size, stride, padding,
                                      dilation, "conv")
    in_rows = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=indices.device)
    out_rows = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=indices.device)
    return out_indices, out_shape, in_rows, out_rows


def max_pool(features: Tensor, indices: Tensor, spatial_shape: Sequence[int], batch_size: int,
             kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
             dilation: IntOrSeq = 1) -> tuple[Tensor, Tensor, list[int]]:
    """Sparse max pool: true max over the active inputs of each window (its gradient shares
    ties out evenly; the op gives it to the first tied input, so tests compare gradients on
    distinct values)."""
    out_indices, out_shape, in_rows, out_rows = _pool_pairs(indices, spatial_shape, kernel_size,
                                                            stride, padding, dilation)
    src = features.index_select(0, in_rows.to(features.device))
    index = out_rows.to(features.device)[:, None].expand_as(src)
    # Every output row has at least one pair, so include_self=False gives the true max. The
    # ignored initial value is NaN, which equals nothing: scatter_reduce's backward still counts
    # an initial value equal to the max as a tie (0 or -inf would take a share of a window
    # whose max is 0 or -inf).
    out = features.new_full((len(out_indices), features.shape[1]), float("nan"))
    out = out.scatter_reduce(0, index, src, "amax", include_self=False)
    return out, out_indices, out_shape


def avg_pool(features: Tensor, indices: Tensor, spatial_shape: Sequence[int], batch_size: int,
             kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
             dilation: IntOrSeq = 1) -> tuple[Tensor, Tensor, list[int]]:
    """Sparse average pool: mean over the active inputs of each window (not kernel volume)."""
    out_indices, out_shape, in_rows, out_rows = _pool_pairs(indices, spatial_shape, kernel_size,
                                                            stride, padding, dilation)
    in_rows, out_rows = in_rows.to(features.device), out_rows.to(features.device)
    n_out = len(out_indices)
    sums = features.new_zeros((n_out, features.shape[1]))
    sums = sums.index_add(0, out_rows, features.index_select(0, in_rows))
    counts = torch.bincount(out_rows, minlength=n_out).to(features.dtype)
    return sums / counts[:, None], out_indices, out_shape


def _global_pool(features: Tensor, indices: Tensor, batch_size: int, reduce) -> Tensor:
    batch = indices[:, 0].to(device=features.device, dtype=torch.long)
    rows = []
    for b in range(batch_size):
        items = features[batch == b]
        # A batch item without sites pools to zeros.
        rows.append(reduce(items) if len(items) else features.new_zeros(features.shape[1]))
    return torch.stack(rows) if rows else features.new_zeros((0, features.shape[1]))


def global_max_pool(features: Tensor, indices: Tensor, batch_size: int) -> Tensor:
    """Dense ``[B, C]`` max over each batch item's active sites."""
    return _global_pool(features, indices, batch_size, lambda f: f.amax(0))


def global_avg_pool(features: Tensor, indices: Tensor, batch_size: int) -> Tensor:
    """Dense ``[B, C]`` mean over each batch item's active sites."""
    return _global_pool(features, indices, batch_size, lambda f: f.mean(0))
