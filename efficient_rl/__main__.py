"""`python -m efficient_rl ...`: the `efficient-rl` command, for an environment whose scripts are not on PATH."""

import sys

from efficient_rl.cli import main

if __name__ == "__main__":  # not when a tool walks the package's modules
    sys.exit(main())
