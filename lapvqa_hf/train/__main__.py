"""`python -m lapvqa_hf.train` (under `accelerate launch`): see `lapvqa_hf.train`."""

import sys

from .command import main

sys.exit(main())
