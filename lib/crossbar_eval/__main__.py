"""`python -m lib.crossbar_eval` (see lib.crossbar_eval.cli)."""
import sys

from lib.crossbar_eval.cli import main

sys.exit(main())
