"""``python -m prunus`` is the ``prunus`` command (used by ``torchrun -m prunus``)."""

import sys

from prunus.cli import main

sys.exit(main())
