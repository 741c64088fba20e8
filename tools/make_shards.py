#!/usr/bin/env python3
"""Turn raw audio + captions into verified WebDataset shards; see `make_shards.py --help`.

A thin entry point over ``clapscale.shards.cli`` (the same as ``clapscale shards ...``).
"""

import sys

from clapscale.errors import debug_enabled, run_command
from clapscale.shards.cli import main

if __name__ == "__main__":
    # Same rule as `clapscale shards`: a user error is one line and exit 2 (CLAPSCALE_DEBUG=1: traceback).
    sys.exit(run_command("make_shards", main, sys.argv[1:], debug=debug_enabled()))
