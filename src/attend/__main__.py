"""`python -m attend ...`: the same command line as the `attend` console script."""

from .cli import main

raise SystemExit(main())
