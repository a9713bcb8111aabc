"""The command line as a user meets it: a run's files, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetsim.results.accounting import HOURLY_COLUMNS
from fleetsim.results.output import REQUEST_SCHEMA, read_metadata

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name = "cli-test"
seed = 3
[simulation]
hours = 24
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
[traffic]
requests_per_day = 20000
diurnal = "azure-conv"
prompt = { dist = "uniform", low = 10, high = 400 }
output = { dist = "fixed", value = 50 }
"""


def fleetsim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_writes_24_contract_rows_and_requests(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    out = tmp_path / "out"
    p = fleetsim(
        "run",
        str(f),
        "--out",
        str(out),
        "--requests",
        "--set",
        "fleet.replicas=3",
        "--set",
        "traffic.requests_per_day=24000",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    t = pq.read_table(out / "hourly.parquet")
    assert t.num_rows == 24
    assert tuple(t.schema.names) == HOURLY_COLUMNS
    md = read_metadata(out / "hourly.parquet")
    assert md["fleetsim.scenario_text"] == GOOD
    assert md["fleetsim.seed"] == "3"
    cfg = json.loads(md["fleetsim.config"])
    assert cfg["fleet"]["replicas"] == 3 and cfg["traffic"]["requests_per_day"] == 24000
    # the catalog profile as the default serving stack runs it
    assert md["fleetsim.profile_id"] == "h100-sxm-analytic+vllm-v1"
    r = pq.read_table(out / "requests.parquet")
    assert r.schema.names == REQUEST_SCHEMA.names
    assert r.num_rows == sum(t.column("requests_arrived").to_pylist())
    status = r.column("status").to_pylist()
    assert status.count("completed") == sum(t.column("requests_completed").to_pylist())
    done = r.filter(
        pq.ParquetFile(out / "requests.parquet")
        .read()
        .column("status")
        .to_numpy(zero_copy_only=False)
        == "completed"
    )
    ttft = done.column("ttft_s").to_numpy()
    assert (ttft > 0).all()
    e2e = done.column("e2e_s").to_numpy()
    assert (e2e >= ttft).all()
    assert "total cost" in p.stdout and "peak hour" in p.stdout
    # no temporary files are left behind
    assert sorted(x.name for x in out.iterdir()) == [
        ".fleetsim-manifest.json",  # what the run wrote (results/output.py RunOutput)
        "hourly.parquet",
        "requests.parquet",
    ]
    # an existing output folder is not overwritten without --force
    p2 = fleetsim("run", str(f), "--out", str(out), cwd=tmp_path)
    assert p2.returncode == 2 and "--force" in p2.stderr


BAD = [
    (
        "unknown key",
        "[fleet]\nreplicass = 2\n",
        ["fleet.replicass", "unknown key", "did you mean 'replicas'"],
    ),
    ("wrong type", '[fleet]\nreplicas = "two"\n', ["fleet.replicas", "'two'"]),
    ("negative rate", "[traffic]\nrequests_per_day = -5\n", ["traffic.requests_per_day", "-5"]),
    (
        "diurnal 23",
        "[traffic]\ndiurnal = [" + ",".join(["1"] * 23) + "]\n",
        ["traffic.diurnal", "24"],
    ),
    (
        "unknown gpu",
        '[hardware]\ngpu = "h100"\n',
        ["hardware.gpu", "'h100'", "did you mean 'h100-sxm'"],
    ),
    (
        "unknown model",
        '[model]\nname = "llama-3-70b"\n',
        ["model.name", "llama-3-70b", "llama-3.1-70b"],
    ),
    (
        "does not fit",
        '[model]\nname = "gpt3-175b"\n[fleet]\ntensor_parallel = 2\n',
        ["fleet.tensor_parallel", "GB missing", "tensor_parallel = 6 (the smallest"],
    ),
    (
        "bad dist",
        '[traffic]\nprompt = { dist = "poisson", mean = 3 }\n',
        ["traffic.prompt", "dist"],
    ),
    (
        "nan price",
        "[cost]\nelectricity_usd_per_kwh = nan\n",
        ["cost.electricity_usd_per_kwh", "nan"],
    ),
    ("bad toml", "[fleet\nreplicas = 2\n", ["not valid TOML"]),
]


@pytest.mark.parametrize("name,text,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_clear_line(tmp_path, name, text, needles):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    out = tmp_path / "out"
    p = fleetsim("run", str(f), "--out", str(out), cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()


def test_bad_override_and_missing_file(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    p = fleetsim(
        "run", str(f), "--set", "fleet.replicas=-1", "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert p.returncode == 2 and "fleet.replicas = -1" in p.stderr
    p = fleetsim("validate", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert p.returncode == 2 and "no such scenario file" in p.stderr


def test_validate_prints_resolved(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    p = fleetsim("validate", str(f), cwd=tmp_path)
    assert p.returncode == 0
    cfg = json.loads(p.stdout)
    assert cfg["fleet"]["tensor_parallel"] == 1 and cfg["cost"]["hardware"] == "owned"
    assert "KV budget" in p.stderr


def test_delegated_subcommands_keep_their_options(tmp_path):
    """`fleetsim sweep --grid ...` style options reach the subcommand's own parser."""
    p = fleetsim("sweep", "--help", cwd=tmp_path)
    assert p.returncode == 0 and "--grid" in p.stdout
    p = fleetsim("plan", "--help", cwd=tmp_path)
    assert p.returncode == 0 and "--tp" in p.stdout
