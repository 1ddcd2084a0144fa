"""``python -m loraplex`` (what ``torchrun ... -m loraplex train CONFIG`` runs)."""

import sys

from .cli import main

sys.exit(main())
