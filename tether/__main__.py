"""``python -m tether``: the command line, so launchers that run modules (``torchrun -m``, ``accelerate launch -m``)
start tether's commands."""

import sys

from tether.cli import main

sys.exit(main())
