"""The package as a user installs it (issue 12, item 5): ``pip install .`` (not editable) into a fresh venv, then the
digits quickstart and a Fashion-MNIST sample from a folder outside the repository, with nothing written into the
install. The check is ``.ci/install-check`` (a CI step of ``.ci/run``); this test runs the same script."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "install-check"


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(shutil.which("git") is None, reason="the check copies the tree with git ls-files")
def test_plain_install_runs_the_quickstart_from_elsewhere(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "install-check: passed" in out.stdout
