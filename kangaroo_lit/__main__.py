"""``python -m kangaroo_lit`` is ``kangaroo-lit``."""

import sys

from kangaroo_lit.cli import main

sys.exit(main())
