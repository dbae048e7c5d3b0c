import sys

from jpq_core.cli import main

sys.exit(main())
