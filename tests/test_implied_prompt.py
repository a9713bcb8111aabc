"""The chat prompt mean against the KV-limited rows (calibrate/mlenergy.py ``--implied-prompt``,
``implied_prompt_mean``; ``--chat-prompt-mean``): the mean at which the simulated window batch
equals the measured one, solved on the simulation (docs/accuracy-log.md, "The chat prompt mean
re-estimated")."""

from __future__ import annotations

import numpy as np
import pytest

from fleetsim.calibrate import mlenergy as ml


@pytest.fixture(scope="module")
def configs() -> list[ml.Config]:
    return ml.select(ml.read_configs())[0]


def _rng() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([0, 7, 11]))


def test_mean_override_scales_the_same_draws(configs):
    """``draw_prompts(mean=400)`` draws the same 1,024 trace indices as the task's 250 and scales
    them by 400 / trace mean: every prompt is the 250 draw's x 1.6 within the two roundings
    (half a token of its own, 1.6 x half a token of the 250 draw's: 1.3); the constant shape
    gives 400 each."""
    c = ml.find_config("Qwen/Qwen3-8B", "H100", 1, 512, configs=configs)
    a = ml.draw_prompts(c, 1024, _rng(), "azure").astype(float)
    b = ml.draw_prompts(c, 1024, _rng(), "azure", mean=400).astype(float)
    big = a > 10
    assert np.all(np.abs(b[big] - 1.6 * a[big]) <= 1.3 + 1e-9)
    assert b.mean() / a.mean() == pytest.approx(1.6, rel=0.005)
    k = ml.draw_prompts(c, 50, _rng(), "constant", mean=400)
    assert set(k.tolist()) == {400}


def test_kv_limited_rows_are_the_closed_forms(configs):
    """The rows solved are those whose measured batch stays below 95 % of max_num_seqs on one
    engine, non-suspect: the nine of the closed form (implied_prompts), six of them chat."""
    rows = [c for c in configs if ml.kv_limited(c)]
    assert [c.key for c in rows] == [c.key for c, _ in ml.implied_prompts(configs)]
    assert len(rows) == 9
    assert sum(c.task == "lm-arena-chat" for c in rows) == 6


def test_qwen3_8b_h100_b512_implies_about_400(configs):
    """Qwen3-8B chat on one H100 at max_num_seqs 512 held 474.4 sequences (measured); the
    simulation holds all 512 at the assumed 250-token mean and 474.4 (within 0.2 %) at a mean
    of about 400 (the solver stops within the tolerance). The simulated cache is 0.9 x 79.19
    GiB less 15.26 GiB of weights and the 0.81 GiB activation peak: 55.2 GiB, so one GiB per
    GPU that the simulator does not reserve moves this estimate by 2^30 / (474.4 x 147,456
    bytes per token) = 15.3 tokens: the most robust estimator."""
    c = ml.find_config("Qwen/Qwen3-8B", "H100", 1, 512, task="lm-arena-chat", configs=configs)
    r = ml.implied_prompt_mean(c, start=250)
    assert r.note == ""
    assert r.tried[0] == (250.0, pytest.approx(512.0))
    assert 395 <= r.mean <= 410
    assert r.tried[-1][1] == pytest.approx(474.4, rel=0.002)
    gib, per = ml.reserve_sensitivity(c)
    assert gib == pytest.approx(0.9 * 79.19 - 15.256 - 0.8125, abs=0.01)
    assert per == pytest.approx(2**30 / (474.4 * 147456), rel=1e-6)


def test_unbracketed_row_reports_a_bound(configs):
    """A row whose simulation holds more sequences than measured even at the upper end of the
    search says so (a bound, not a value): the 8B row searched only up to 300 tokens."""
    c = ml.find_config("Qwen/Qwen3-8B", "H100", 1, 512, task="lm-arena-chat", configs=configs)
    r = ml.implied_prompt_mean(c, start=250, hi=300)
    assert r.note.startswith("not bracketed")
    assert r.mean == 250
