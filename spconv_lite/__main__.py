"""``python -m spconv_lite``: the ``spconv-lite`` command."""

import sys

from .cli import main

sys.exit(main())
