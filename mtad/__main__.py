import sys

from mtad.cli.main import main

sys.exit(main())
