"""Test-suite settings: property tests draw the same examples on every run (reproducible CI);
``HYPOTHESIS_PROFILE=explore`` draws new ones each run to search further. Shared fixtures."""

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="module")
def setup_py():
    """The project's setup.py as a module (not run as __main__: it defines its helpers and builds nothing)."""
    spec = importlib.util.spec_from_file_location("gpoe_fusion_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
