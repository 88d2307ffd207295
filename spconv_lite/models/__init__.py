"""3D detection and segmentation model layers with OpenPCDet's structure and parameter names.

- :class:`SparseBasicBlock`: residual block of two submanifold convs.
- :func:`post_act_block`: conv + BatchNorm1d + ReLU, the unit of the backbones.
- :class:`VoxelBackBone8x` (SECOND), :class:`VoxelResBackBone8x` (residual, CenterPoint /
  PV-RCNN++ style): 8x downsampling sparse encoders.
- :class:`UNetV2`: sparse U-Net with inverse convs (PartA2), per-voxel features for
  segmentation.
- :class:`HeightCompression`: the encoded sparse tensor -> dense bird's-eye-view map.

Module and parameter names match OpenPCDet's ``pcdet.models.backbones_3d`` and
``backbones_2d.map_to_bev``, so the 3D-backbone part of an OpenPCDet checkpoint loads with
``load_state_dict``. Every model takes ``spconv=``: the module namespace whose layers it is built
from (default ``spconv_lite.pytorch``); passing ``spconv.pytorch`` builds the very same network
with spconv, which is how the parity tests compare the two libraries.
"""

from .backbones import (
    SparseBasicBlock,
    VoxelBackBone8x,
    VoxelResBackBone8x,
    post_act_block,
)
from .bev import HeightCompression
from .unet import UNetV2

__all__ = [
    "SparseBasicBlock",
    "VoxelBackBone8x",
    "VoxelResBackBone8x",
    "post_act_block",
    "HeightCompression",
    "UNetV2",
]
