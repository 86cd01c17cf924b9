"""``python -m mpsearch.cli``: the ``mpsearch`` command."""

import sys

from mpsearch.cli import main

sys.exit(main())
