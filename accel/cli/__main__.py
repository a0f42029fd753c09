"""``python -m accel.cli``, as ``python -m accel`` and the ``accel`` script."""
import sys

from accel.cli import main

sys.exit(main())
