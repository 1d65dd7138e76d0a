"""Test-suite settings: property tests draw the same examples on every run (reproducible CI);
``HYPOTHESIS_PROFILE=explore`` draws new ones each run to search further. Shared fixtures."""

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings
from rhd.synthetic import generate_rhd
from sim2real.synthetic import generate_sim2real

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


@pytest.fixture(scope="session")
def rhd_root(tmp_path_factory):
    """A tiny built-in RHD (8 training, 4 evaluation frames), shared read-only by the pipeline tests."""
    return generate_rhd(tmp_path_factory.mktemp("rhd"), num_training=8, num_evaluation=4, seed=0, progress=False)


@pytest.fixture(scope="session")
def sim2real_root(tmp_path_factory):
    """A tiny built-in Sim2Real (7 scenes of 2 views), shared read-only by the pipeline tests."""
    return generate_sim2real(tmp_path_factory.mktemp("sim2real"), scenes=7, views_per_scene=2, progress=False)
