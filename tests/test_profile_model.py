"""The profile file as a pydantic model with its own JSON Schema (issue #15).

``fleetsim schema --profile`` prints a schema that accepts every profile the project ships and
every profile ``fleetsim calibrate`` writes (a round trip of the catalog's analytic profiles),
and rejects the bad values the loader rejects; a bad profile stays one line naming the field,
its value and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from fleetsim.apps.cli import main
from fleetsim.base.errors import UserError
from fleetsim.device.latency import LinearProfile, RooflineProfile
from fleetsim.device.profile import (
    LinearFile,
    RooflineFile,
    catalog_profile,
    parse_profile,
    profile_from_dict,
    profile_to_dict,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("profiles/*.json")) + sorted(ROOT.glob("tests/data/*.json"))
GOOD = {
    "format": "fleetsim-profile/1",
    "kind": "roofline",
    "name": "t",
    "peak_flops": 9.89e14,
    "mem_bw_bytes_per_s": 3.35e12,
    "mem_bytes": 8.0e10,
    "compute_eff_max": 0.6,
    "compute_eff_half_tokens": 256,
    "memory_eff": 0.7,
    "overhead_s": 0.004,
    "power": {"idle_w": 100, "max_w": 700, "active_w": 50, "compute_w": 500, "memory_w": 100},
}
LINEAR = {"format": "fleetsim-profile/1", "kind": "linear", "base_s": 0.01, "per_seq_s": 1e-4}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["schema", "--profile"]) == 0
    schema = json.loads(buf.getvalue())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == "fleetsim profile" and "``" not in buf.getvalue()
    return jsonschema.Draft202012Validator(schema)


def test_schema_accepts_shipped_and_written_profiles(validator):
    assert len(SHIPPED) >= 2
    for f in SHIPPED:
        d = json.loads(f.read_text())
        validator.validate(d)
        assert isinstance(parse_profile(d, str(f)), RooflineFile)
    # what calibrate writes: profile_to_dict of a catalog GPU's analytic profile (with kernels)
    from fleetsim.device import catalog

    for gpu in ("h100-sxm", "a100-80gb", "h200"):
        prof = catalog_profile(gpu, dict(catalog.gpu(gpu)))
        d = json.loads(json.dumps(profile_to_dict(prof, catalog_gpu=gpu, notes=["x"])))
        validator.validate(d)
        back = profile_from_dict(d, f"{gpu}.json")
        assert isinstance(back, RooflineProfile)
        assert back.peak_flops == prof.peak_flops and back.kernels == prof.kernels
        assert back.meta["catalog_gpu"] == gpu
    validator.validate(LINEAR)
    lin = profile_from_dict(LINEAR, "lin.json")
    assert isinstance(lin, LinearProfile) and lin.name == "lin"
    assert (lin.base_s, lin.per_seq_s, lin.prefill_base_s, lin.mem_bytes) == (0.01, 1e-4, 0, 80e9)
    assert isinstance(parse_profile(LINEAR), LinearFile)


BAD = [
    ({**GOOD, "peak_flops": -1.0}, "field 'peak_flops' = -1.0 must be a finite non-negative"),
    ({**GOOD, "peak_flops": 0}, "field 'peak_flops' = 0.0 must be positive"),
    ({**GOOD, "memory_eff": True}, "field 'memory_eff' = True must be a finite non-negative"),
    ({**GOOD, "memory_eff": "0.7"}, "field 'memory_eff' = '0.7' must be a finite non-negative"),
    ({**GOOD, "mem_bytes": 1e16}, "field 'mem_bytes' = 1e+16 is above the limit 1e+15"),
    ({**GOOD, "overhead_s": 4000}, "field 'overhead_s' = 4000 is above the limit 3600"),
    ({**GOOD, "kind": "cubic"}, "'kind' is 'cubic'; expected 'roofline' or 'linear'"),
    ({**GOOD, "power": 5}, "field 'power' = 5 must be a JSON object or null"),
    ({**GOOD, "power": {"max_w": 700}}, "roofline profile lacks power.idle_w"),
    ({**GOOD, "power": {"idle_w": 800, "max_w": 700}}, "power.idle_w = 800.0: idle power above"),
    ({**GOOD, "power": {"idle_w": 1, "max_w": 2e5}}, "'power.max_w' = 200000.0 is above the limit"),
    ({**GOOD, "overhead_per_layr_s": 1e-5}, "did you mean 'overhead_per_layer_s'?"),
    ({**LINEAR, "per_seq_s": -1}, "field 'per_seq_s' = -1 must be a finite non-negative"),
    ({k: v for k, v in LINEAR.items() if k != "base_s"}, "linear profile lacks base_s"),
]


@pytest.mark.parametrize("d,needle", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_profile_is_one_line_and_the_schema_agrees(validator, d, needle):
    with pytest.raises(UserError) as e:
        profile_from_dict(d, "p.json")
    msg = str(e.value)
    assert needle in msg and msg.startswith("p.json: ") and "\n" not in msg, msg
    assert "(fix:" in msg
    if "did you mean" not in needle and "positive" not in needle and "idle power" not in needle:
        # the schema rejects the same file (cross-field physics and typos are the loader's)
        assert not validator.is_valid(d)
