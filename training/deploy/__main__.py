import sys

from training.deploy.cli import main

sys.exit(main())
