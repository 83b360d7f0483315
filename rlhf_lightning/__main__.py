"""`python -m rlhf_lightning ...` is the same as the `rlhf` console script."""

import sys

from rlhf_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
