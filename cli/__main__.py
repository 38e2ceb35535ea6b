"""`python -m cli ...`: the `k2jax` command."""

import sys

from cli.command import main

sys.exit(main())
