"""The Prefect flows. Importing them sets Prefect's environment default first: no telemetry (and no errors offline)."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
