import sys

from urae.cli import main

sys.exit(main())
