#!/usr/bin/env python3
"""Build the real-audio shard set from Debian game sound packages (see clapscale/shards/realcorpus.py)."""

import sys

from clapscale.shards.realcorpus import main

if __name__ == "__main__":
    sys.exit(main())
