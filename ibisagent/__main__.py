"""`python -m ibisagent` runs the command line."""

import sys

from ibisagent.cli import main

sys.exit(main())
