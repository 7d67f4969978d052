"""The command line: help, and bad input ends with a message and exit code 2."""

import json
import subprocess
import sys

from diffusers import DDIMScheduler

from fastdiff.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("info", "schedule", "data"):
        assert command in out.stdout


def test_schedule_prints_the_grid(tmp_path, capsys):
    DDIMScheduler(timestep_spacing="trailing").save_config(tmp_path)
    assert main(["schedule", str(tmp_path), "--steps", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.split()[1]) for line in lines[1:]] == [999.0, 749.0, 499.0, 249.0]


def test_bad_input_exit_code_2(tmp_path, capsys):
    assert main(["schedule", str(tmp_path)]) == 2
    assert "no scheduler config" in capsys.readouterr().err
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "cubic"}))
    assert main(["schedule", str(tmp_path)]) == 2
    assert "unknown beta_schedule 'cubic'" in capsys.readouterr().err
    assert main(["data", "fashion-mnist", "--root", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["data", "8gaussians", "--grid", str(tmp_path / "g.png")]) == 2
    assert not (tmp_path / "g.png").exists()


def test_data_grid(tmp_path):
    assert main(["data", "digits", "--grid", str(tmp_path / "digits.png"), "--num", "16"]) == 0
    assert (tmp_path / "digits.png").stat().st_size > 0
