"""The replica core (serving/core.py) with its KV policies and pool roles (serving/roles.py)."""

from __future__ import annotations

import inspect

import pytest
from conftest import ListSink, merge, resolved

from fleetsim.apps.simulate import simulate
from fleetsim.serving.core import ReplicaCore
from fleetsim.serving.kv_paged import PagedKV
from fleetsim.serving.kv_policy import KVPolicy
from fleetsim.serving.kv_reserve import ReserveKV
from fleetsim.serving.roles import DecodeRole, PrefillRole, replica_class

# what a policy need not provide: the reserve policy never preempts (so it never admits a
# request to recompute) and never ends a run for a waiting request (so never asks _fit_at)
NOT_NEEDED = {ReserveKV: {"_admit_head", "_fit_at"}, PagedKV: set()}


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("role", ["both", "prefill", "decode"])
def test_replica_classes_compose_a_policy_and_a_role(paged, role):
    """Each (policy, role) pair is one class: the core last in its bases, the role before the
    policy, and every method of the policy interface implemented (none left to KVPolicy's
    stubs, which raise)."""
    cls = replica_class(paged, role)
    policy = PagedKV if paged else ReserveKV
    mro = cls.__mro__
    assert policy in mro and mro.index(ReplicaCore) > mro.index(policy)
    assert mro.index(KVPolicy) == mro.index(ReplicaCore) + 1
    want_role = {"both": None, "prefill": PrefillRole, "decode": DecodeRole}[role]
    for r in (PrefillRole, DecodeRole):
        assert (r in mro) == (r is want_role)
    if want_role is not None:
        assert mro.index(want_role) < mro.index(policy)
    interface = [n for n, f in vars(KVPolicy).items() if inspect.isfunction(f)]
    assert len(interface) >= 15
    missing = [
        n
        for n in interface
        if getattr(cls, n) is getattr(KVPolicy, n) and n not in NOT_NEEDED[policy]
    ]
    assert missing == []
    # one slot layout for all: the core's (no __dict__, so a misspelt attribute fails)
    assert "__dict__" not in dir(cls)


def _requests(d: dict) -> tuple[object, dict[int, tuple]]:
    sink = ListSink()
    res = simulate(resolved(d), request_sink=sink)
    return res, sink.rows


def test_reserve_and_paged_give_the_same_times_without_kv_pressure(small):
    """With KV to spare, whole prompts (no chunking) and no prefix cache, the two policies make
    the same decisions: every admission, run and cut point comes from the one core, so every
    request's replica, first-token and finish time agree exactly, and so do the hourly work
    and energy. Only the KV accounting differs (blocks in use are recorded under paging)."""
    base = merge(
        small,
        simulation={"hours": 2},
        traffic={**small["traffic"], "requests_per_day": 20_000},
        fleet={
            **small["fleet"],
            "router": "least_loaded",
            "enable_chunked_prefill": False,
            "enable_prefix_caching": False,
            "max_batched_tokens": 8192,
        },
    )
    paged, rp = _requests(merge(base, fleet={**base["fleet"], "kv_allocation": "paged"}))
    rsv, rr = _requests(
        merge(
            base,
            fleet={
                **base["fleet"],
                "kv_allocation": "reserve",
                "enable_chunked_prefill": None,
                "enable_prefix_caching": None,
            },
        )
    )
    assert len(rp) > 500 and rp.keys() == rr.keys()
    assert all(rp[k] == rr[k] for k in rp)  # replica, prompt, output, first token, finish
    assert paged.totals.preemptions == 0
    assert paged.totals.iterations == rsv.totals.iterations
    assert paged.totals.events == rsv.totals.events
    for col in ("gpu_busy_s", "energy_gpu_kwh", "output_tokens", "prompt_tokens"):
        assert paged.hourly.column(col).to_pylist() == rsv.hourly.column(col).to_pylist()
    # the paged policy records the blocks it holds; the reserve policy records none
    kv_p = paged.hourly.column("kv_utilization").to_pylist()
    kv_r = rsv.hourly.column("kv_utilization").to_pylist()
    assert all(0 < u < 1 for u in kv_p) and not any(u > 0 for u in kv_r), (kv_p, kv_r)
