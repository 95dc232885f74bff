import sys

from uswap.cli import main

sys.exit(main())
