"""Where the shared data lives: $SOLVERIFY_DATA, else ../shared/data beside the repo.

Tests that need it are skipped (with the reason shown) only when it is absent.
"""

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SOLVERIFY_DATA", _REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data not found at {DATA} (set SOLVERIFY_DATA)"
)
