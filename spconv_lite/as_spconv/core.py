"""``spconv.core``: ``ConvAlgo`` (accepted by the layers and ignored)."""

from ..nn.conv import ConvAlgo

__all__ = ["ConvAlgo"]
