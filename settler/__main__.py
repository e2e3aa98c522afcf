import sys

from settler.cli import main

sys.exit(main())
