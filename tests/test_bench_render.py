"""Rendering of benchmark records that no quick run produces: the router-units comparison of `fastdiff bench cache`."""

from fastdiff.bench.cache import render_cache


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
