"""Test-suite settings: property tests draw the same examples on every run (reproducible CI);
``HYPOTHESIS_PROFILE=explore`` draws new ones each run to search further."""

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
