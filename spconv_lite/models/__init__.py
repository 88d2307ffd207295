"""3D detection and segmentation model layers with OpenPCDet's structure and parameter names.

- :class:`SparseBasicBlock`: residual block of two submanifold convs.
- :func:`post_act_block`: conv + BatchNorm1d + ReLU, the unit of the backbones.
- :class:`VoxelBackBone8x` (SECOND), :class:`VoxelResBackBone8x` (residual, CenterPoint /
  PV-RCNN++ style): 8x downsampling sparse encoders.
- :class:`UNetV2`: sparse U-Net with inverse convs (PartA2), per-voxel features for
  segmentation.
- :class:`HeightCompression`: the encoded sparse tensor -> dense bird's-eye-view map.
- :class:`VoxelResBackBone8xVoxelNeXt`: VoxelNeXt's fully sparse encoder (levels 4 to 6 merged
  in place onto one grid, then 2D sparse BEV features).
- :class:`SpUNetBase`, :class:`SpUNetBlock`: Pointcept's sparse segmentation U-Net (with 1x1
  layers, read as spconv 2.x reads them).

Module and parameter names match OpenPCDet's ``pcdet.models.backbones_3d`` and
``backbones_2d.map_to_bev`` (and Pointcept's ``sparse_unet`` for ``SpUNetBase``), so the
3D-backbone part of a checkpoint loads with ``load_state_dict``. Every model built from sparse
layers (all but :class:`HeightCompression`) takes ``spconv=``:
the module namespace whose layers it is built from (default ``spconv_lite.pytorch``); passing
``spconv.pytorch`` builds the very same network with spconv, which is how the parity tests
compare the two libraries.
"""

from .backbones import (
    SparseBasicBlock,
    VoxelBackBone8x,
    VoxelResBackBone8x,
    post_act_block,
)
from .bev import HeightCompression
from .spunet import SpUNetBase, SpUNetBlock
from .unet import UNetV2
from .voxelnext import VoxelResBackBone8xVoxelNeXt

__all__ = [
    "SparseBasicBlock",
    "VoxelBackBone8x",
    "VoxelResBackBone8x",
    "post_act_block",
    "HeightCompression",
    "UNetV2",
    "VoxelResBackBone8xVoxelNeXt",
    "SpUNetBase",
    "SpUNetBlock",
]
