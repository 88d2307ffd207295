"""``spconv.pytorch.functional``: the user-facing functions on sparse tensors.

spconv's autograd ``Function`` classes (``indice_conv``, ``indice_subm_conv``, ...) work on
its own pair format and are not provided; spconv_lite's differentiable ops are in
``spconv_lite.ops`` (also importable as ``spconv_lite.pytorch.ops``).
"""

from ..functional import sparse_add

# spconv 2.x has a second implementation of the same operation; one is enough here.
sparse_add_hash_based = sparse_add

__all__ = [
    "sparse_add",
    "sparse_add_hash_based",
]
