import sys

from ditgraft.cli import main

sys.exit(main())
