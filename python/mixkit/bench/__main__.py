"""`python -m mixkit.bench [options]` is `mixkit bench [options]`."""

import sys

from mixkit.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
