"""`python -m updetr` is the `updetr` command."""
import sys

from updetr.cli import main

sys.exit(main())
