import sys

from fleetsim.apps.cli import main

sys.exit(main())
