"""The scripts' bad input: a clear message on stderr, exit code 2, and nothing written or overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, args", [("dmd2_multistep_diagnostic.py", ["some-student"]), ("high_guidance_thresholding.py", [])])
def test_an_existing_out_is_refused_and_kept(tmp_path, script, args):
    out = tmp_path / "result.json"
    out.write_text("earlier result")
    done = _run(script, *args, "--out", str(out))
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    assert out.read_text() == "earlier result"


@pytest.mark.parametrize("args, message", [(["--samples", "0"], "--samples must be >= 1"),
                                           ([], "is not a diffusers pipeline folder"),
                                           (["--generator-steps", "0"], "generator_steps must be in 1..")])  # fmt: skip
def test_dmd2_diagnostic_bad_input_exits_2_without_writing(tmp_path, args, message):
    student = tmp_path / "student"
    if "--generator-steps" in args:  # a real pipeline folder, so that the step count is what is refused
        from fastdiff.eval.assets import teacher_path

        student = teacher_path("digits")
    out = tmp_path / "result.json"
    done = _run("dmd2_multistep_diagnostic.py", str(student), *args, "--out", str(out))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
