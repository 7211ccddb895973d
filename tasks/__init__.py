"""Prefect tasks: thin wrappers that do I/O, retries, caching, artifacts and tracking around bolmo_core."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
