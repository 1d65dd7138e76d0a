"""setup.py's message when torch cannot be imported says what to do: under pip's build isolation,
install without it; otherwise install torch first. Nothing here builds anything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]




def test_pip_build_isolation_is_detected(setup_py, monkeypatch):
    monkeypatch.setattr(sys, "path", ["/tmp/pip-build-env-k2j4h1/site", "/tmp/pip-build-env-k2j4h1/overlay/lib/python3.11/site-packages"])
    assert setup_py._in_isolated_build_env()
    message = setup_py._missing_torch_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert "pip's build isolation hides the installed torch" in message
    assert "pip install --no-build-isolation -e ." in message and "pip install --no-build-isolation .\n" in message


def test_build_env_of_python_m_build_is_detected(setup_py, monkeypatch):
    monkeypatch.setattr(sys, "prefix", "/tmp/build-env-x8f2k0c1")
    monkeypatch.setattr(sys, "path", ["/tmp/build-env-x8f2k0c1/lib/python3.11/site-packages"])
    assert setup_py._in_isolated_build_env()


def test_missing_torch_outside_isolation(setup_py, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(ROOT), "/usr/lib/python3.11", "/opt/venv/lib/python3.11/site-packages"])
    monkeypatch.setattr(sys, "prefix", "/opt/venv")
    assert not setup_py._in_isolated_build_env()
    message = setup_py._missing_torch_message(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert "torch is not installed" in message
    assert "pip install torch==2.14.1 torchvision==0.29.1\n  pip install --no-build-isolation -e ." in message
    broken = setup_py._missing_torch_message(ImportError("libc10.so: cannot open shared object file"))
    assert "torch is installed but does not import" in broken and "libc10.so" in broken


@pytest.mark.parametrize("isolated", [True, False])
def test_setup_py_exits_with_the_message_and_no_traceback(tmp_path, isolated):
    """setup.py run as pip runs it, with torch hidden: it stops at the torch import, before any build."""
    shadow = tmp_path / ("pip-build-env-ab12cd34" if isolated else "elsewhere") / "site"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow), PYTHONNOUSERSITE="1")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    expected = "pip's build isolation hides the installed torch" if isolated else "torch is not installed"
    assert expected in proc.stderr
