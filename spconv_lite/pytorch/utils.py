"""``spconv.pytorch.utils``: ``PointToVoxel`` and ``gather_features_by_pc_voxel_id``."""

from __future__ import annotations

from typing import Union

import torch

from ..voxelize import PointToVoxel

__all__ = ["PointToVoxel", "gather_features_by_pc_voxel_id"]

def gather_features_by_pc_voxel_id(seg_res_features: torch.Tensor, pc_voxel_id: torch.Tensor,
                                   invalid_value: Union[int, float] = 0) -> torch.Tensor:
    """Per-point rows of per-voxel results: row ``i`` is ``seg_res_features[pc_voxel_id[i]]``,
    or ``invalid_value`` where ``pc_voxel_id[i] == -1`` (a point that was dropped).

    Example:
        >>> gather_features_by_pc_voxel_id(torch.tensor([[1.0], [2.0]]), torch.tensor([1, -1, 0]))
        tensor([[2.],
                [0.],
                [1.]])
    """
    ids = pc_voxel_id.to(seg_res_features.device).long()
    valid = ids >= 0
    gathered = seg_res_features[ids.clamp(min=0)]
    mask = valid.view(-1, *([1] * (seg_res_features.dim() - 1)))
    return torch.where(mask, gathered, gathered.new_tensor(invalid_value))

