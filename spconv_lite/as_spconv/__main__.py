"""``python -m spconv_lite.as_spconv SCRIPT [ARGS...]`` / ``-m MODULE [ARGS...]``: runs a
script or module with ``import spconv`` resolving to spconv_lite."""

from ..standin import main

main()
