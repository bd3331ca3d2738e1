"""``python -m mmtard.cli`` (and ``torchrun -m mmtard.cli``): the ``mmtard`` command."""

import sys

from mmtard.cli import main

if __name__ == "__main__":
    sys.exit(main())
