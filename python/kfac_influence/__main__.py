"""``python -m kfac_influence``: the ``kfac-influence`` command."""
import sys

from .cli import main

sys.exit(main())
