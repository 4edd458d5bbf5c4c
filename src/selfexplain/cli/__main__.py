"""``python -m selfexplain.cli``: the ``selfexplain`` command."""

import sys

from . import main

sys.exit(main())
