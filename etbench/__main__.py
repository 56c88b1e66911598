"""``python -m etbench …``: the same command line as the ``etbench`` script."""

import sys

from etbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
