"""``python -m thinstore``: the same CLI as the ``thinstore`` console script."""

import sys

from thinstore.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
