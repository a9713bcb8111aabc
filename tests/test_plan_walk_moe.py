"""A capacity engineer's walk of ``fleetsim plan`` for today's MoE models (helper W43):
Qwen3-235B-A22B-FP8 named by its Hugging Face id, data-parallel x expert-parallel splits as a
searched dimension (``--dp``), refusals that name the smallest split that holds the weights,
and plan tables that say over what horizon their cost is. Each test is a failure the walk found
or a capability it added; values are hand counts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fleetsim.apps.cli import main
from fleetsim.apps.plan import candidate_base, make_candidates
from fleetsim.base.errors import ScenarioError
from fleetsim.config.aggregated import model_spec
from fleetsim.config.loading import scenario_from_dict
from fleetsim.config.resolve import resolve
from fleetsim.device.moe import replica_weight_bytes

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
Q235_ID = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
Q30 = MODELS / "Qwen/Qwen3-30B-A3B-Instruct-2507"

# Qwen3-235B-A22B's weights outside the experts, by hand (config.json: hidden 4096, 64 query
# heads and 4 KV heads of 128, 94 layers, 128 experts, vocabulary 151,936, untied embeddings):
# per layer q 4096 x 8192 + k, v 2 x 4096 x 512 + o 8192 x 4096 = 71,303,168, x 94 =
# 6,702,497,792 fp8 bytes; the router 4096 x 128 x 94 = 49,283,072 bf16 parameters (vLLM's gate
# is unquantized) = 98,566,144 bytes; embedding and LM head 2 x 151,936 x 4096 = 1,244,659,712
# bf16 parameters = 2,489,319,424 bytes (the norms' 0.8 MB are not counted).
NON_EXPERT_BYTES = 6_702_497_792 + 98_566_144 + 2_489_319_424
#: what each further tensor-parallel rank of an engine holds beyond its share: the router whole
#: (ModelSpec.tp_extra_weight_bytes; 4 KV heads: none replicated at TP2)
ROUTER_BYTES = 98_566_144


def _q235(**fleet) -> dict:
    return {
        "model": {"name": Q235_ID},
        "hardware": {"gpu": "h100-sxm"},
        "fleet": {"max_batch_size": 256, "max_batched_tokens": 8192, **fleet},
        "simulation": {"hours": 1},
    }


def test_a_checkout_id_plans_at_its_files_precision():
    """``[model] name = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"`` (an id the checkout ships, no
    ``config``): the scenario dump the planner, sweeps and pod workers reload wrote the default
    ``dtype = "bf16"``, so every plan candidate was a 470.2 GB bf16 model and TP2 x DP2 H100s
    (4 x 85.0 GB x 0.9 = 306.1 GB usable) was refused as needing 486.2 GB."""
    sc = scenario_from_dict(_q235(tensor_parallel=2, data_parallel=2, expert_parallel=True))
    data = sc.model_dump(mode="json")
    assert "dtype" not in data["model"]
    again = resolve(scenario_from_dict(data), "").model
    assert again.dtype == "fp8" and round(again.weight_bytes / 1e8) == 2364  # 236.4 GB
    # the experts once, the rest once per engine: 236.4 + 9.29 = 245.7 GB at DP2; at TP2 each
    # engine's second rank holds the router too: + 2 x 0.099 = 245.9 GB
    assert replica_weight_bytes(again, 2, 1) - again.weight_bytes == pytest.approx(
        NON_EXPERT_BYTES, rel=1e-6
    )
    assert replica_weight_bytes(again, 2, 2) - again.weight_bytes == pytest.approx(
        NON_EXPERT_BYTES + 2 * ROUTER_BYTES, rel=1e-6
    )
    (c,) = make_candidates(data, sc, ["h100-sxm"], [2], "")
    assert c.rs is not None, c.problem
    kv = c.rs.kv
    assert kv is not None
    assert round(kv.weight_bytes / 1e8) == 2459
    # 0.9 x 4 x 85,029,615,043 B - weights - activations, in 192,512-byte tokens (94 layers x
    # 4 KV heads x 128 x 2 x 2 bytes)
    usable = 0.9 * 4 * 85_029_615_043
    assert kv.tokens == pytest.approx(
        (usable - kv.weight_bytes - kv.activation_bytes) / 192_512, abs=16
    )
    # a scenario that sets the precision keeps it
    mine = scenario_from_dict({"model": {"name": Q235_ID, "dtype": "bf16"}})
    assert model_spec(scenario_from_dict(mine.model_dump(mode="json")), "").dtype == "bf16"


def test_a_data_parallel_split_that_does_not_fit_names_the_smallest_that_does():
    """TP1 x DP2 H100s (153.1 GB) for 245.7 GB: it said ``use more GPUs per replica``. The
    smallest vLLM accepts: TP2 at DP2 (4 GPUs: 245.9 < 306.1 GB), or DP4 at TP1 (EP4, 128
    experts / 4; 236.4 + 3 x 9.29 = 264.3 < 306.1 GB; DP3's EP3 does not divide 128)."""
    sc = scenario_from_dict(_q235(tensor_parallel=1, data_parallel=2, expert_parallel=True))
    with pytest.raises(ScenarioError) as e:
        resolve(sc, "")
    msg = str(e.value)
    assert "weights need 245.7 GB on a replica of 2 GPUs" in msg
    assert "153.1 GB usable (2 x 85 GB x 0.9)" in msg
    assert (
        "set fleet.tensor_parallel = 2 (4 GPUs per replica) or fleet.data_parallel = 4 "
        "(4 GPUs per replica)" in msg
    )


def test_a_candidate_of_another_dp_keeps_the_per_engine_batch_limits():
    """vLLM's ``--max-num-seqs`` / ``--max-num-batched-tokens`` hold for each engine of a
    ``--data-parallel-size`` launch; fleetsim's are the replica's totals. A scenario at DP2 with
    256 / 8192 runs 128 / 4096 per engine; its DP4 candidate keeps them: 512 / 16384, DP1 128 /
    4096."""
    sc = scenario_from_dict(_q235(tensor_parallel=2, data_parallel=2, expert_parallel=True))
    data = sc.model_dump(mode="json")
    four = candidate_base(data, "b200", 2, "h100-sxm", 4)["fleet"]
    one = candidate_base(data, "b200", 2, "h100-sxm", 1)["fleet"]
    assert (four["data_parallel"], four["max_batch_size"], four["max_batched_tokens"]) == (
        4,
        512,
        16384,
    )
    assert (one["data_parallel"], one["max_batch_size"], one["max_batched_tokens"]) == (
        1,
        128,
        4096,
    )
    same = candidate_base(data, "b200", 2, "h100-sxm")["fleet"]
    assert (same["data_parallel"], same["max_batch_size"]) == (2, 256)


def test_plan_searches_data_parallel_splits(tmp_path, capsys):
    """``fleetsim plan --dp 1,2``: Qwen3-30B-A3B (128 experts) on TP1 H100s, each replica TP1 x
    DP1 or TP1 x DP2 with EP2; the table has a DP column and its GPUs are replicas x TP x DP;
    the schedule names its data_parallel and a scenario of another DP refuses it by name."""
    p = tmp_path / "s.toml"
    p.write_text(
        f'[model]\nconfig = "{Q30}"\n[hardware]\ngpu = "h100-sxm"\n'
        "[fleet]\ntensor_parallel = 1\nexpert_parallel = true\nmax_batch_size = 64\n"
        "[simulation]\nhours = 1\n[traffic]\nrequests_per_day = 2000\ndiurnal = 'flat'\n"
    )
    out = tmp_path / "plan"
    argv = ["plan", str(p), "--gpus", "h100-sxm", "--tp", "1", "--dp", "1,2", "--out", str(out)]
    assert main([*argv, "--workers", "1"]) == 0
    text = capsys.readouterr().out
    rows = {r["data_parallel"]: r for r in pq.read_table(out / "plan.parquet").to_pylist()}
    assert set(rows) == {1, 2}
    for dp, r in rows.items():
        assert r["status"] == "ok"
        assert r["gpus"] == r["replicas"] * 1 * dp
    assert "DP" in text and "each replica is TP x DP GPUs" in text
    sched = json.loads((out / "schedule.json").read_text())
    best = pq.read_table(out / "plan.parquet").to_pylist()[0]
    assert sched["data_parallel"] == best["data_parallel"]

    # the schedule runs on a scenario of its split, and is refused by one of another
    def with_schedule(dp: int):
        fleet = {"tensor_parallel": 1, "data_parallel": dp, "expert_parallel": True}
        fleet["max_batch_size"] = 64 * dp
        auto = {"policy": "schedule", "schedule_file": str(out / "schedule.json")}
        return scenario_from_dict(
            {"model": {"config": str(Q30)}, "fleet": fleet, "autoscaler": auto}
        )

    assert (
        resolve(with_schedule(best["data_parallel"]), "").scenario.fleet.data_parallel
        == (best["data_parallel"])
    )
    other = 2 if best["data_parallel"] == 1 else 1
    with pytest.raises(ScenarioError, match=f"set fleet.data_parallel = {best['data_parallel']}"):
        resolve(with_schedule(other), "")


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--dp", ""], "--dp '': empty list"),
        (["--dp", "0"], "--dp '0': values must be >= 1"),
        (["--dp", "2", "--designs", "disaggregated"], "--dp '2': a dimension of the aggregated"),
    ],
)
def test_plan_dp_flag_mistakes_are_one_line(flags, line, tmp_path, capsys):
    p = tmp_path / "s.toml"
    p.write_text(f'[model]\nconfig = "{Q30}"\n[simulation]\nhours = 1\n')
    rc = main(["plan", str(p), "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and line in err and "Traceback" not in err


def test_a_sweep_over_gpus_says_the_scenarios_hardware_fields_hold_for_each():
    """``--set hardware.rent_usd_per_gpu_hour=2.0 --grid 'hardware.gpu=["h100-sxm","b200"]'``:
    the B200 row was priced at the H100's $2.00 (8 GPU-h: $16.33 against the H100's $16.25)
    without a word, where ``fleetsim plan`` prices it from the catalog ($6.50)."""
    from fleetsim.apps.sweep import parse_grid, shared_hardware_note

    axes = parse_grid(['hardware.gpu=["h100-sxm","b200"]', "fleet.tensor_parallel=2"])
    base = {"hardware": {"gpu": "h100-sxm", "rent_usd_per_gpu_hour": 2.0}}
    note = shared_hardware_note(base, axes)
    assert note.startswith(
        "note: the scenario's [hardware] rent_usd_per_gpu_hour = 2.0 holds for every "
        "hardware.gpu of the grid (h100-sxm, b200), as given"
    )
    assert "fix: make it a grid axis" in note
    # nothing to say: no GPU axis, no other [hardware] field, or the field is an axis itself
    assert shared_hardware_note(base, parse_grid(["fleet.replicas=1,2"])) == ""
    assert shared_hardware_note({"hardware": {"gpu": "b200"}}, axes) == ""
    both = parse_grid(['hardware.gpu=["h100-sxm","b200"]', "hardware.rent_usd_per_gpu_hour=2,6"])
    assert shared_hardware_note(base, both) == ""


def test_plan_tables_label_cost_over_the_simulated_horizon(capsys):
    """A 2-hour plan's ``$/day`` column held 2 hours of cost (4 B200 x $6.50 x 2 h = $52, read
    as a day's: 12 times too small)."""
    import pyarrow as pa

    from fleetsim.apps.common import console
    from fleetsim.apps.plan import PLAN_COLUMNS, Slo, print_plan
    from fleetsim.apps.plan_search import horizon

    assert (horizon(24), horizon(2)) == ("day", "2 h")
    row = {k: None for k, _ in PLAN_COLUMNS}
    row.update(gpu="b200", tensor_parallel=4, data_parallel=1, status="ok", rank=1)
    row.update(replicas=1, gpus=4, total_cost_usd=52.9, hardware_cost_usd=52.0)
    table = pa.Table.from_pylist([row])
    print_plan(table, Slo(2.0, 0.1), None, console(), hours=2)
    out = capsys.readouterr().out
    assert "$/2 h" in out and "kWh/2 h" in out and "$/day" not in out
    assert "$ and kWh over the simulated 2 h (simulation.hours), not a day" in out


def test_the_python_api_plans_data_parallel_splits():
    """``fleetsim.plan(..., data_parallel=2)`` as ``--dp 2``: one TP1 x DP2 replica of
    Qwen3-30B-A3B on H100s is 2 GPUs; a bad list names the argument."""
    import fleetsim

    sc = {
        "model": {"config": str(Q30)},
        "fleet": {"tensor_parallel": 1, "expert_parallel": True, "max_batch_size": 64},
        "simulation": {"hours": 1},
        "traffic": {"requests_per_day": 2000, "diurnal": "flat"},
    }
    table, sched = fleetsim.plan(sc, gpus=["h100-sxm"], tensor_parallel=[1], data_parallel=2)
    (row,) = table.to_pylist()
    assert (row["data_parallel"], row["replicas"], row["gpus"], row["status"]) == (2, 1, 2, "ok")
    assert sched is not None and sched["data_parallel"] == 2
    with pytest.raises(ScenarioError, match=r"data_parallel = \[0\]: expected a list"):
        fleetsim.plan(sc, data_parallel=[0])


def test_latency_header_puts_the_weight_only_note_on_the_weights(capsys):
    """DeepSeek-V3.1 (fp8) on A100s, which have no fp8 compute: the header read ``fp8 weights,
    embedding bf16 (weight-only: ...)``, as if the bf16 embedding were the weight-only part."""
    argv = ["latency", "--gpu", "a100-80gb", "--model", "deepseek-ai/DeepSeek-V3.1", "--tp", "8",
            "--dp", "2", "--expert-parallel", "--batch", "1", "--context", "100"]  # fmt: skip
    assert main(argv) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith(
        "deepseek-ai/DeepSeek-V3.1 (fp8 weights (weight-only: no native compute in that "
        "precision), embedding bf16, kv bf16) on 16 x a100-80gb (TP8 x DP2, EP16)"
    )


def test_a_candidate_whose_weights_do_not_fit_names_the_smallest_split_that_does():
    """The plan's ``does not fit`` lines dropped the fix: H100 TP1 x DP2 for Qwen3-235B-A22B-FP8
    now says TP2 (at DP2) or DP4 (at TP1) holds the weights, candidates to add."""
    sc = scenario_from_dict(_q235(tensor_parallel=2, data_parallel=2, expert_parallel=True))
    (c,) = make_candidates(sc.model_dump(mode="json"), sc, ["h100-sxm"], [1], "", dps=[2])
    assert c.rs is None
    assert c.problem.startswith("does not fit: ") and "weights need 245.7 GB" in c.problem
    assert (
        "(fix: set fleet.tensor_parallel = 2 (4 GPUs per replica) or fleet.data_parallel = 4"
        in (c.problem)
    )


def test_a_split_vllm_refuses_is_not_accepted_rather_than_does_not_fit():
    """``--dp 1,2,3`` on Qwen3-30B-A3B: DP3's EP3 does not divide 128 experts, and a central
    queue cannot feed a per-rank DP replica; both read ``does not fit`` though 30.5 GB of
    weights fit one H100 with room to spare."""
    sc = scenario_from_dict(
        {
            "model": {"config": str(Q30)},
            "fleet": {"tensor_parallel": 1, "expert_parallel": True, "router": "central_queue"},
        }
    )
    one, two, three = make_candidates(
        sc.model_dump(mode="json"), sc, ["h100-sxm"], [1], "", dps=[1, 2, 3]
    )
    assert one.rs is not None
    assert two.problem.startswith("not accepted: a central queue hands requests to replicas")
    assert three.problem.startswith("not accepted: ") and "do not divide over EP" in three.problem
    from fleetsim.apps.plan import candidate_row

    assert [candidate_row(c, 1)["status"] for c in (two, three)] == ["not accepted"] * 2


def test_the_planners_best_case_holds_gemma3s_windowed_sequences():
    """gemma-3-27b on one H100 at ~25k-token prompts: 10 full-attention layers keep 81,920 bytes
    per token (16 KV heads x 128 x 2 x 2 bytes x 10) and 52 sliding layers 1,024 tokens each
    (436,207,616 bytes per sequence), so a 25,000-token sequence holds 2.48 GB where full
    attention would hold 12.7 GB (507,904 bytes per token): the 21.1 GB KV budget holds 8 such
    sequences, not 1, and the planner's best case (where its search starts) counts 8."""
    from fleetsim.apps.plan_search import BestCase, mean_sizes

    sc = scenario_from_dict(
        {
            "model": {"name": "google/gemma-3-27b-it"},
            "hardware": {"gpu": "h100-sxm"},
            "fleet": {"tensor_parallel": 1, "max_batch_size": 128, "max_batched_tokens": 8192},
            "traffic": {
                "prompt": {
                    "dist": "lognormal",
                    "median": 24000,
                    "sigma": 0.3,
                    "min": 8000,
                    "max": 60000,
                },
                "output": {
                    "dist": "lognormal",
                    "median": 300,
                    "sigma": 0.5,
                    "min": 20,
                    "max": 2000,
                },
            },
        }
    )
    rs = resolve(sc, "")
    assert rs.kv is not None and round(rs.kv.kv_bytes / 1e8) == 211  # 21.1 GB
    assert rs.model.kv_bytes_per_token == 507_904
    sizes = mean_sizes(rs, "")
    per_seq = sizes.prompt + sizes.output / 2
    windowed = 81_920 * per_seq + 52 * 1024 * 8192
    assert int(rs.kv.kv_bytes // windowed) == 8
    assert int(rs.kv.kv_bytes // (507_904 * per_seq)) == 1
    # the planner's KV per running sequence is weighted by time in flight (three 8,192-token
    # prefill chunks hold less than the whole prompt: results/capacity.py): still 8
    assert 0.95 * per_seq < sizes.kv_per_seq < per_seq
    assert BestCase.of(rs, 128, 8192, sizes).batch == 8


def test_pod_workers_run_a_checkout_id_at_its_files_precision(tmp_path, capsys):
    """Qwen3-235B-A22B-FP8 named by its id on TP4 x DP2 H100s: with ``--workers`` the pods are
    tasks that reload the dumped scenario (apps/executors.py ``pod_runner``), which said bf16,
    so ``fleetsim run --workers 1`` simulated 470 GB of bf16 weights under a header that said
    fp8 (the walk's scenario, an hour at 20,000 requests a day: 6.74 facility kWh against 8.36
    in-process; ``plan``, ``sweep``, ``crossover`` and the report's flat day reload dumps
    too). The same day either way."""
    p = tmp_path / "s.toml"
    p.write_text(
        f'[model]\nname = "{Q235_ID}"\n[hardware]\ngpu = "h100-sxm"\n'
        "[fleet]\ntensor_parallel = 4\ndata_parallel = 2\nexpert_parallel = true\n"
        "max_batch_size = 256\nmax_batched_tokens = 8192\n"
        "[simulation]\nhours = 1\n[traffic]\nrequests_per_day = 20000\ndiurnal = 'flat'\n"
    )
    totals = []
    for workers in ([], ["--workers", "1"]):
        argv = ["run", str(p), "--out", str(tmp_path / "o"), "--force", "--json", *workers]
        assert main(argv) == 0
        totals.append(json.loads(capsys.readouterr().out)["totals"])
    for k in ("energy_facility_kwh", "requests_completed", "output_tokens"):
        assert totals[0][k] == totals[1][k]
