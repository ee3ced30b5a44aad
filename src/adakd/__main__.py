"""`python -m adakd` (and `torchrun -m adakd`) runs the CLI."""
import sys

from adakd.cli import main

sys.exit(main())
