"""Test-only startup hook: with this directory on PYTHONPATH and MOONFORGE_FAKE_STAGES=1, Python
imports this module at startup in every process (Prefect worker, `moonforge serve`, and the
flow-run processes they spawn) and routes every stage kind to tests/conftest.py's FakeStage.

This is how the server integration tests run real deployments through a real worker without
training a model; nothing in moonforge itself reads MOONFORGE_FAKE_STAGES.
"""

import os
import sys
from pathlib import Path

if os.environ.get("MOONFORGE_FAKE_STAGES") == "1":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for conftest
    from conftest import FakeStage

    from moonforge.stages import catalog

    _fake = FakeStage()
    catalog.stage_function = lambda kind: _fake
    sys.path.pop(0)
