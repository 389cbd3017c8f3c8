import sys

from cadis.cli import main

sys.exit(main())
