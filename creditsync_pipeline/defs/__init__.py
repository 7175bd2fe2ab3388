"""Dagster definitions, one module per Dagster concept; ``definitions.py`` assembles them."""

import warnings

# dagster.yaml's python_logs handler (CREDITSYNC_LOG_FILE, see creditsync_pipeline.logs) is a
# documented Dagster feature marked beta; its warning would print in every run's process.
warnings.filterwarnings("ignore", message="Handling yaml-defined logging configuration", category=Warning)
