"""Shared test set-up: nothing may reach a model hub, and the two tiers are told apart by a
marker: every test under tests/integration is `integration` (real Ray / MLflow / Serve), so
`pytest -m "not integration"` runs exactly the Ray-free tier in tests/unit."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Mark by directory, so a new integration module cannot land in the fast tier by forgetting
    its `pytestmark`."""
    for item in items:
        if INTEGRATION in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
