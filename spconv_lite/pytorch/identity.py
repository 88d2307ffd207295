"""``spconv.pytorch.identity``: ``Identity``."""

from ..nn.modules import Identity

__all__ = ["Identity"]
