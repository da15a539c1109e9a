"""``python -m pilus ...`` is the ``pilus`` command."""

import sys

from pilus.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
