"""`python -m efficient_rl ...`: the `efficient-rl` command, for an environment whose scripts are not on PATH."""

import sys

from efficient_rl.cli import main

sys.exit(main())
