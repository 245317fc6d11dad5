"""`python -m ibisagent_training.grpo` (and `accelerate launch -m ibisagent_training.grpo`): the GRPO command line."""

import sys

from .trainer import main

sys.exit(main())
