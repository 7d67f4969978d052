"""The benchmark report is rendered from JSON (BENCHMARKS.md and the README's marked section), never by hand."""

import json

from fastdiff.bench import README_END, README_START, machine, write_report


def _teachers_json():
    stats = {"mean": 1.5, "std": 0.1, "values": [1.4, 1.5, 1.6]}
    teacher = {
        "num_samples": 100, "reference": "x:test", "nfe": 50, "teacher_fid_50nfe": stats, "train_vs_test_floor": stats,
        "self_fid": 0.0, "sampling_seconds_per_seed": 1.0, "teacher_params": 2e6, "teacher_train_minutes": 30.0,
        "teacher_steps": 3500, "model": "dit", "extractor_test_accuracy": 0.9,
    }  # fmt: skip
    inception = {"fid_digits_train32_vs_test32": 1e-9, "self_fid": 0.0, "feature_dim": 2048, "resize": "tf1", "seconds": 3.0,
                 "weights": "random"}  # fmt: skip
    return {"machine": machine(), "quick": False, "teachers": {"fashion-mnist": teacher}, "inception": inception}


def test_report_regenerates_benchmarks_and_readme(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "teachers.json").write_text(json.dumps(_teachers_json()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nstale\n{README_END}\noutro\n")
    write_report(tmp_path / "bench", tmp_path / "BENCHMARKS.md", readme)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| fashion-mnist | dit | 2.00 M | 3500 steps, 30 CPU-min | 100 | 1.5 ± 0.1 | 1.5 ± 0.1 | 1.0x |" in report
    assert "Regenerate: `fastdiff bench teachers`" in report and "do not edit by hand" in report
    text = readme.read_text()
    assert "stale" not in text and "### Teachers and the evaluator" in text and text.endswith(f"{README_END}\noutro\n")


def test_samplers_oracle_quick_orders():
    from fastdiff.bench import bench_samplers_oracle

    rows = {r["sampler"]: r for r in bench_samplers_oracle(quick=True, progress=False)["rows"]}
    assert 0.85 < rows["euler"]["fitted_order"] < 1.15 and 1.8 < rows["heun"]["fitted_order"] < 2.4
    assert rows["heun"]["nfe"] == [10, 20, 40] and rows["plms"]["nfe"] == [6, 11, 21]
    assert all(r["error"][-1] < r["error"][0] for r in rows.values())
