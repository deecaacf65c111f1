import sys

from trainkit.sweep.cli import main

sys.exit(main())
