"""`python -m pipeline.cli` and `accelerate launch -m pipeline.cli run RECIPE`: the same as `reasoning-qat`."""

import sys

from pipeline.cli import main

sys.exit(main())
