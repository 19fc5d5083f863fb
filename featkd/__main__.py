"""``python -m featkd`` (and ``torchrun -m featkd``) = the ``featkd`` script."""

import sys

from featkd.cli import main

sys.exit(main())
