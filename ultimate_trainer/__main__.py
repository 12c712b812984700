import sys

from ultimate_trainer.cli import main

sys.exit(main())
