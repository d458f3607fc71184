"""``python -m kangaroo_lit.bench <name> ...``: the benchmarks without importing LightningCLI."""

import sys

from kangaroo_lit.bench.cli import main

sys.exit(main())
