import sys

from dbtools.cli import main

sys.exit(main())
