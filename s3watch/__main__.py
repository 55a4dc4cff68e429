"""Allow `python -m s3watch`."""

import sys

from .cli import main

sys.exit(main())
