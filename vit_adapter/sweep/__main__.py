"""`python -m vit_adapter.sweep`: the same as `vit-adapter sweep`, without the CLI wrapper."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
