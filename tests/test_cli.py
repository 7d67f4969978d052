"""The command line: help, and bad input ends with a message and exit code 2."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DDIMScheduler

import fastdiff

from fastdiff.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("info", "schedule", "data"):
        assert command in out.stdout


@pytest.mark.parametrize("kernels", [True, False])
def test_info_says_whether_bf16_training_is_emulated_here(monkeypatch, capsys, kernels):
    from fastdiff import machine

    monkeypatch.setattr(machine, "cpu_bf16_kernels", lambda: kernels)
    assert main(["info"]) == 0
    cpu = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU: "))
    assert ("--set trainer.mixed_precision=no" in cpu) != kernels and ("auto: bf16" in cpu) == kernels


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


# every subcommand's options: the split into parser + commands (issue 12) and later edits keep them all
OPTIONS = {
    "": "-h --help",
    "info": "-h --help",
    "train": "recipe -h --help --set --resume --lpips-weights --no-progress",
    "pairs": "teacher -h --help --out --num --scheduler --steps --guidance --seed --shard-size --no-progress",
    "sample": "-h --help --pipeline --scheduler --steps --guidance --num-samples --seed --batch-size --no-progress --classes --out "
              "--nrow --scale --preview --overwrite --cache --schedule",
    "cache": "-h --help",
    "cache calibrate": "pipeline -h --help --scheduler --overwrite --no-progress --seed --steps --degree --generations --batch-size --out",
    "cache train-router": "pipeline -h --help --scheduler --overwrite --no-progress --seed --steps --beta --iterations --batch-size "
                          "--forecast --init-every --guidance --granularity --out",
    "fid": "sources -h --help --pipeline --scheduler --steps --guidance --num-samples --seed --batch-size --no-progress --extractor "
           "--inception-weights --kid --pr --size --json --save-stats --no-cache",
    "quickstart": "-h --help --teacher --num-samples --steps --guidance --seed --out --cache --student --no-optimised-schedules --no-progress",
    "bench": "name -h --help --quick --no-progress --out --report --readme --recipes --resume --shard --rows --finished-only",
    "schedule": "-h --help",
    "schedule show": "config -h --help --steps --spacing --mu",
    "schedule optimize": "pipeline -h --help --scheduler --steps --guidance --samples --fine --seed --sigma-data --out --refine --overwrite --no-progress",
    "data": "name -h --help --split --root --size --channels --labels --seed --grid --num",
}  # fmt: skip


def _options(parser, prefix: str = "") -> dict[str, set[str]]:
    """``{"sample": {"--pipeline", ...}, "cache calibrate": {...}}`` from an argparse parser, recursively."""
    import argparse

    found = {prefix: set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_options(sub, f"{prefix} {name}".strip()))
        else:
            found[prefix] |= set(action.option_strings or [action.dest])
    return found


def test_every_subcommand_keeps_its_options():
    from fastdiff.cli import build_parser

    assert _options(build_parser()) == {k: set(v.split()) for k, v in OPTIONS.items()}


def test_sample_and_fid_defaults():
    from fastdiff.cli import build_parser

    parse = build_parser().parse_args
    sample = parse(["sample", "--pipeline", "digits"])
    assert (sample.num_samples, sample.steps, sample.batch_size, sample.out, sample.preview) == (64, 20, 250, "outputs/samples", 100)
    assert parse(["fid", "--pipeline", "digits", "digits:test"]).num_samples == 1000
    bench = parse(["bench", "report"])
    assert (bench.out, bench.report, bench.readme, bench.recipes) == ("benchmarks", "BENCHMARKS.md", "README.md", "recipes")



def test_quickstart_options_default_to_the_library_config():
    """``fastdiff quickstart`` with no option runs exactly ``QuickstartConfig()`` (the CLI once said 500 samples and
    4,8,16 steps while the library's default was 250 samples at 4,8: twice the documented ~3 minutes)."""
    from fastdiff.cli import build_parser
    from fastdiff.cli.commands import quickstart_config
    from fastdiff.quickstart import QuickstartConfig

    assert quickstart_config(build_parser().parse_args(["quickstart"])) == QuickstartConfig()
    custom = quickstart_config(build_parser().parse_args(["quickstart", "--num-samples", "40", "--steps", "2,3", "--cache", "none"]))
    assert (custom.num_samples, custom.steps, custom.cache) == (40, (2, 3), None)

CLI = Path(__file__).resolve().parent.parent / "fastdiff" / "cli"
COMPUTE_MODULES = {"torch", "numpy", "scipy", "PIL"}


def test_cli_commands_hold_no_computation():
    """The CLI parses arguments, calls library functions and prints: it imports no array library and its functions
    stay short (grids, FID records, label cycling, schedule tables live in the library)."""
    offenders = []
    for path in sorted(CLI.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in COMPUTE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in COMPUTE_MODULES:
                offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 30:
                offenders.append(f"{path.name}: {node.name} has {node.end_lineno - node.lineno + 1} lines")
    assert not offenders, offenders


def test_cycle_labels():
    from fastdiff.errors import InputError
    from fastdiff.pipelines.runs import cycle_labels

    assert cycle_labels([3, 4], 5).tolist() == [3, 4, 3, 4, 3]
    assert cycle_labels([7], 3).tolist() == [7, 7, 7] and cycle_labels([1, 2, 3], 2).tolist() == [1, 2]
    with pytest.raises(InputError, match="at least one class label"):
        cycle_labels([], 4)


def test_pipeline_path_finds_shipped_teachers_from_anywhere(tmp_path, monkeypatch):
    """A shipped teacher by name, or as the package-relative ``assets/teachers/...`` that recipes use, resolves from
    any working directory; an existing folder is taken as given."""
    from fastdiff.eval.assets import ASSETS, pipeline_path

    monkeypatch.chdir(tmp_path)
    assert pipeline_path("digits") == ASSETS / "teachers" / "digits"
    assert pipeline_path("assets/teachers/fashion-mnist") == ASSETS / "teachers" / "fashion-mnist"
    (tmp_path / "assets" / "teachers" / "digits").mkdir(parents=True)
    assert pipeline_path("assets/teachers/digits") == Path("assets/teachers/digits")  # the user's own folder wins
    assert pipeline_path("elsewhere") == Path("elsewhere")  # left for the loader to report
    assert ASSETS.parent == Path(fastdiff.__file__).resolve().parent  # package data, not a checkout folder


def test_lpips_weights_are_refused_for_recipes_that_are_not_ctm(capsys):
    from pathlib import Path

    from fastdiff.cli import main

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "cd_digits.yaml"
    assert main(["train", str(recipe), "--lpips-weights", "vgg16.pth"]) == 2
    assert "--lpips-weights is for CTM recipes (objective: ctm)" in capsys.readouterr().err
