"""``python -m etbench.cli …``: the same command line as the ``etbench`` script (Ray job entrypoints use it)."""

import sys

from etbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
