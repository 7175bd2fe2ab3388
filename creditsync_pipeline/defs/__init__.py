"""Dagster definitions, one module per Dagster concept; ``definitions.py`` assembles them."""
