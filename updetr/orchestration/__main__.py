"""`python -m updetr.orchestration run|submit|jobs|mlflow-server|local-cluster` (the Ray Job entrypoint)."""
import sys

from updetr.orchestration.commands import main

sys.exit(main())
