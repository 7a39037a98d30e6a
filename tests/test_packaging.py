"""`pip install .`, the way Python users install, gives a working kerasbig on its own: no step that only the
Makefile does (tensorflow-serving-api and the default config included)."""
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_pip_install_into_a_fresh_virtualenv_gives_working_commands(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True,
                             timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:]
    # Away from the checkout, so that only the installed package can be imported.
    plan = subprocess.run([python, "-m", "kerasbig.train", "--mode=dry_run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "digits_cnn: 1 replica(s)" in plan.stdout and "parameters" in plan.stdout
    imports = subprocess.run([python, "-c", "import kerasbig.serve, kerasbig.predict, kerasbig.export, kerasbig; "
                              "from tensorflow_serving.apis import prediction_service_pb2_grpc; "
                              "print(kerasbig.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert imports.returncode == 0, imports.stderr[-3000:]
    assert str(venv) in imports.stdout
