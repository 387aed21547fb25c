"""`python -m tandem_cli ...`: the `tandem` command without the console script."""

import sys

from tandem_cli.main import main

sys.exit(main())
