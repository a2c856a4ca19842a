"""``python -m kfac_influence``: the ``kfac-influence`` command."""
import sys

from .app.cli import main

sys.exit(main())
