"""A measured profile used the way a user uses it: through `[hardware] profile = "path"`.

The committed CPU profile (`profiles/cpu-llama-3.1-8b.json`, measured with `fleetsim calibrate`)
carries its raw grid beside it. A scenario that names the profile and the calibrated model must
predict every measured prefill and decode time within the profile's own reported fit error, and
must run. No torch needed: this is the simulator's side of the contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetsim.apps.simulate import simulate
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "cpu-llama-3.1-8b.json"


def _scenario(raw: dict, n_layers: int) -> dict:
    cfg = dict(raw["model_config"])
    return {
        "seed": 1,
        "simulation": {"hours": 1},
        "model": {"name": cfg["name"], "dtype": cfg["dtype"], "n_layers": n_layers},
        "hardware": {"gpu": "h100-sxm", "profile": str(PROFILE)},  # power falls back to the catalog
        "fleet": {
            "replicas": 1,
            "max_batch_size": 8,
            "max_batched_tokens": 4096,
            "router": "round_robin",
        },
        "traffic": {
            "requests_per_day": 24 * 40,
            "diurnal": "flat",
            "prompt": {"dist": "fixed", "value": 32},
            "output": {"dist": "fixed", "value": 4},
        },
    }


def test_scenario_with_the_profile_reproduces_the_measured_grid():
    raw = json.loads(PROFILE.read_text())
    grid = pq.read_table(PROFILE.parent / raw["grid_file"]).to_pylist()
    fit_err = raw["fit"]["max_rel_err"]
    assert len(grid) == raw["fit"]["n_points"] >= 6
    worst = 0.0
    for layers in sorted({g["n_layers"] for g in grid}):
        rs = resolve(scenario_from_dict(_scenario(raw, layers)))
        assert rs.profile_sha256 and rs.profile.source == "measured"
        lat = rs.latency_model()
        for g in (g for g in grid if g["n_layers"] == layers):
            if g["phase"] == "prefill":
                pred = lat.prefill_time(g["prompt_tokens"], g["batch"])
            else:
                pred = lat.decode_time(g["batch"], g["context_tokens"])
            err = abs(pred / g["time_s"] - 1)
            worst = max(worst, err)
            assert err <= fit_err * (1 + 1e-9), (g, pred, fit_err)
    assert worst == pytest.approx(fit_err, rel=1e-6)  # the reported error is the worst one
    res = simulate(rs)  # and the scenario runs
    assert res.totals.requests_completed > 0
