"""`python -m hm3.cli`: the `hm3` command."""

import sys

from hm3.cli import main

sys.exit(main())
