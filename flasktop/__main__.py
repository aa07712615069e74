import sys

from flasktop.cli import main

sys.exit(main())
