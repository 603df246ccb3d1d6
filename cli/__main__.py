"""`python -m cli ...` is `distill ...` (what `accelerate launch -m cli run RECIPE` runs)."""

import sys

from cli.main import main

sys.exit(main())
