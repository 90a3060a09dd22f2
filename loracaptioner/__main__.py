"""`python -m loracaptioner caption MODEL INPUTS...`, the same as the `loracaptioner` command."""

import sys

from .cli import main

sys.exit(main())
