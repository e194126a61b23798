"""What unit and integration tests share: the folder a test lives in decides its marker, so
`-m "not integration"` selects exactly tests/unit (tests/unit/conftest.py checks that those start
no program; tests/integration/conftest.py has the fixtures that start them)."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION = Path(__file__).parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
