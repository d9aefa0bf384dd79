import sys

from fedbreast.cli import main

sys.exit(main())
