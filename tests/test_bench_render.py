"""Rendering of benchmark records that no quick run produces: the router-units comparison of `fastdiff bench cache`,
the divergence ranking of `fastdiff bench distill`."""

from fastdiff.bench.cache import render_cache
from fastdiff.bench.distill import PAPER_DIVERGENCE_FID, _divergence_ranking


def _row(method, steps, speedup, fid):
    return {"source": "fastdiff", "method": method, "knob": "beta=0.01", "steps": steps, "speedup": speedup, "fid_test": fid,
            "fid_uncached": 1.0, "rmse_to_uncached": 0.1, "reuse_rate": 0.5, "macs_saved": 0.4, "setup_seconds": 12.0}  # fmt: skip


def test_router_units_table_lists_both_granularities_side_by_side():
    uncached = {"fid_test": 10.0, "seconds": [1.0, 1.1], "seconds_min": 1.0}
    data = {"teacher": "fashion-mnist", "num_samples": 8, "steps": [20], "repeats": 1, "uncached": {"20": uncached},
            "rows": [_row("every-N", 20, 2.0, 10.2)],
            "router_units": {"steps": 20, "machine": {}, "uncached": uncached,
                             "rows": [_row("learned router (HarmoniCa), per block", 20, 1.5, 10.4),
                                      _row("learned router (HarmoniCa)", 20, 1.8, 10.1)]}}  # fmt: skip
    lines = render_cache(data)
    start = next(i for i, line in enumerate(lines) if line.startswith("**Router units** (20 steps"))
    table = [line for line in lines[start:] if line.startswith("| learned router")]
    assert table == ["| learned router (HarmoniCa), per block | beta=0.01 | 1.50x | 10.4 | 1 | 50% | 40% | 12 s |",
                     "| learned router (HarmoniCa) | beta=0.01 | 1.80x | 10.1 | 1 | 50% | 40% | 12 s |"]  # fmt: skip
    assert "per-block units err less (FID vs uncached) in 0 of 1 pairs; attention / feed-forward units are faster in 1 of 1." in " ".join(lines)
    assert not any(line.startswith("**Router units**") for line in render_cache({**data, "router_units": None}))


def test_divergence_ranking_takes_the_dmd2_row_as_reverse_kl_and_sorts_by_one_step_fid():
    fids = {"softened_rkl": 3.0, "jensen_shannon": 2.5, "squared_hellinger": 4.0, "forward_kl": 1.5, "jeffreys": 2.0}
    rows = [{"objective": f"f-distill {d}", "fid": {"1": {"mean": v, "std": 0.1}}} for d, v in fids.items()]
    dmd2 = {"objective": "DMD2", "fid": {"1": {"mean": 2.2, "std": 0.3}}}
    from_cd = {"objective": "f-distill jensen_shannon from CD", "fid": {"1": {"mean": 0.5, "std": 0.1}}}  # another init: not ranked
    (line,) = [x for x in _divergence_ranking([dmd2, *rows, from_cd]) if x]
    assert "here forward_kl 1.50 < jeffreys 2.00 < reverse_kl 2.20 < jensen_shannon 2.50 < softened_rkl 3.00 < squared_hellinger 4.00" in line
    assert "(largest seed std 0.30)" in line and "forward_kl 1.92 < squared_hellinger 1.99" in line and len(PAPER_DIVERGENCE_FID) == 6
    assert _divergence_ranking(rows) == []  # without the reverse-KL row there is no full ranking


def test_distill_rows_name_the_machine_they_were_trained_on_where_it_is_another():
    """Two CPUs both named "AMD EPYC" (AVX2 and AVX-512) are told apart by the vector capability a record carries."""
    import torch

    from fastdiff.bench.distill import render_distill
    from fastdiff.machine import machine, machine_label

    here = machine()
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    fid = {"mean": 3.0, "std": 0.1}
    row = {"recipe": "recipes/r.yaml", "steps": 10, "batch_size": 8, "wall_minutes": 1.0, "fid": {"1": fid}}
    rows = [{**row, "objective": "here", "trained_on": machine_label(here)},
            {**row, "objective": "elsewhere", "trained_on": machine_label({**here, "cpu_capability": "AVX512"})},
            {**row, "objective": "older record", "trained_on": machine_label({k: v for k, v in here.items() if k != "cpu_capability"})}]
    data = {"machine": here, "num_samples": 10, "seeds": [0], "student_steps": [1], "teacher_50nfe": fid,
            "teacher_samplers": {"S": {"1": fid}}, "rows": rows, "not_run": []}  # fmt: skip
    table = {line.split(" | ")[0].strip("| "): line for line in render_distill(data) if line.startswith("| ")}
    assert "trained on" not in table["here"]
    assert "(trained on " + here["cpu"] + " (AVX512), " in table["elsewhere"]
    assert "(trained on " + here["cpu"] + ", " in table["older record"]


def test_a_students_record_names_its_cpu_capability_and_precision(tmp_path):
    """training.json keeps the CPU's vector capability (two CPUs named "AMD EPYC" were an AVX2 and an AVX-512 one) and
    the precision the run resolved (``auto``: fp32 without bf16 kernels); the table's provenance prints both."""
    import json

    from fastdiff.bench.distill import _trained_on
    from fastdiff.machine import machine
    from fastdiff.training.distill import _machine

    assert _machine()["cpu_capability"] == machine()["cpu_capability"]
    m = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "cores": 2, "torch_threads": 1, "device": "cpu"}
    for precision, says in (("no", "AMD EPYC (AVX2), 1 torch thread(s), fp32"), ("bf16", "AMD EPYC (AVX2), 1 torch thread(s), bf16 autocast"),
                            (None, "AMD EPYC (AVX2), 1 torch thread(s)")):  # fmt: skip
        (tmp_path / "training.json").write_text(json.dumps({"machine": m, "mixed_precision": precision}))
        assert _trained_on(tmp_path) == says
