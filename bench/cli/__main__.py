"""``python -m moe_routing_bench.bench.cli``: the same as ``moe-bench``."""

import sys

from moe_routing_bench.bench.cli import main

sys.exit(main())
