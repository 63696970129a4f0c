"""`python -m sdlora` runs the command line."""

import sys

from sdlora.cli.main import main

sys.exit(main())
