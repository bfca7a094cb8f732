"""`python -m minisora ...`, what `torchrun -m minisora ...` runs: the same CLI as the `minisora` command."""

import sys

from minisora.cli import main

sys.exit(main())
