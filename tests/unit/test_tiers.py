"""`pytest -m "not integration"` is exactly the Ray-free tier: tests/conftest.py marks every test
under tests/integration, whether or not its module remembers its own `pytestmark`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


class _Item:
    def __init__(self, path: Path):
        self.path, self.markers = path, []

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


def test_every_integration_test_is_marked_and_no_unit_test_is():
    spec = importlib.util.spec_from_file_location("tests_conftest", TESTS / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    integration = _Item(TESTS / "integration" / "test_new_module.py")
    unit = _Item(TESTS / "unit" / "test_new_module.py")
    conftest.pytest_collection_modifyitems(None, [integration, unit])
    assert integration.markers == ["integration"] and unit.markers == []
