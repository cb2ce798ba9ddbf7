"""`python -m bench` (from the repository root)."""
import os
import sys

from .cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # e.g. `| head`: stop quietly, like other command-line tools
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
