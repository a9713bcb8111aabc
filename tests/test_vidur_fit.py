"""The committed kernel model (catalog/kernels.toml) against the committed measurements
(data/vidur-profiling): the fit is refitted from the raw files and must not drift, and its
leave-one-model-out errors are recomputed and held to the issue's bounds."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from fleetsim.calibrate import vidur
from fleetsim.device import catalog
from fleetsim.device.kernels import (
    KernelFit,
    catalog_kernel_fit,
    gemm_time_s,
    interp_table,
    kernel_fit_from_dict,
    kernel_fit_to_dict,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "vidur-profiling"
FLOOR_MEDIAN, FLOOR_WORST = 0.08, 0.25  # issue 13: the floor for resolving it


@pytest.fixture(scope="module")
def fits() -> dict[str, vidur.GpuFit]:
    return {f.catalog_gpu: f for f in vidur.fit_folder(DATA)}


def test_data_is_the_vidur_subset():
    files = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*.csv"))
    assert len(files) == 12  # 10 mlp.csv + 2 all_reduce.csv
    assert (DATA / "LICENSE").read_text().startswith("    MIT License")
    rows = vidur.load_compute(DATA, "h100")
    assert len(rows) == 4437
    assert {r.tp for r in rows} == {1, 2, 4, 8}
    assert min(r.tokens for r in rows) == 1 and max(r.tokens for r in rows) == 4096


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80gb"])
def test_committed_fit_does_not_drift(fits, gpu):
    committed = catalog.kernels()[gpu]
    new = kernel_fit_to_dict(fits[gpu].fit)
    for k, v in committed.items():
        if k.startswith(("gemm_", "elem_")):
            np.testing.assert_allclose(new[k], v, rtol=2e-3, atol=1e-9, err_msg=k)
        elif k.startswith("allreduce_tp") and not k.endswith("_err"):
            np.testing.assert_allclose(new[k], v, rtol=1e-3, err_msg=k)
    lomo = fits[gpu].lomo
    assert lomo is not None
    assert lomo.median == pytest.approx(committed["lomo_median_err"], abs=2e-3)
    assert lomo.worst == pytest.approx(committed["lomo_worst_err"], abs=2e-3)


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80gb"])
def test_leave_one_model_out_error(fits, gpu):
    """Fit on four shapes, predict every TP and token count of the fifth."""
    lomo = fits[gpu].lomo
    assert lomo is not None
    assert lomo.median <= FLOOR_MEDIAN
    # worst case: A100 21.7%, H100 22.6% (the floor is met, the goal of 15% is not: the worst
    # points are cuBLAS kernel-selection jumps, e.g. Qwen-72B's down projection at TP2 takes
    # 123 us at 512 tokens and 295-355 us at 520-592; see the issue report)
    assert lomo.worst <= FLOOR_WORST
    # every held-out model on its own stays within the floor's median
    for mdl, errs in lomo.errors.items():
        assert float(np.median(np.abs(errs))) <= FLOOR_MEDIAN, mdl


@pytest.mark.parametrize("gpu", ["h100-sxm", "a100-80gb"])
def test_allreduce_table(fits, gpu):
    """Over the message sizes TP uses (vidur.ALLREDUCE_BANDS): prefill sizes 12-64 MiB within
    10% at nearly every measured size, also leaving each measurement out; decode sizes
    8 KiB-12 MiB at a median error of a few percent, the fraction within 10% being held down by
    the measurements' own scatter (see vidur.AllreduceCheck); the extrapolation beyond the
    largest measured size tested on the top octave."""
    assert set(fits[gpu].allreduce_checks) == {2, 4, 8}
    for n, checks in fits[gpu].allreduce_checks.items():
        by = {c.band: c for c in checks}
        assert by["prefill"].n > 500 and by["decode"].n > 400
        assert by["prefill"].within10 >= 0.98 and by["prefill"].loo_within10 >= 0.98, n
        assert by["decode"].median_err <= 0.03 and by["decode"].loo_median_err <= 0.04, n
        assert by["decode"].within10 >= 0.75 and by["decode"].loo_within10 >= 0.70, n
        lo, hi = fits[gpu].allreduce_extrapolation[n]
        assert -0.15 <= lo <= hi <= 0.10, n


def test_allreduce_running_median_and_leave_one_out():
    # time linear in size (a latency plus a bandwidth term): the table and its leave-one-out
    # predictions follow it to within the asymmetry of a window of linearly spaced sizes
    # (1-2%, largest at the top end, where the window is cut off)
    pts = [(float(s), 20e-6 + s / 200e9) for s in range(8192, 8 * 2**20, 65536)]
    table = vidur.allreduce_table(pts)
    assert all(abs(t / (20e-6 + s / 200e9) - 1) < 0.02 for s, t in table)
    loo = vidur.allreduce_leave_one_out(pts)
    assert np.allclose(loo, [t for _, t in pts], rtol=0.03)
    # one outlier: the running median ignores it, leaving it out predicts its neighbours
    noisy = [(s, 3 * t if i == 40 else t) for i, (s, t) in enumerate(pts)]
    checks = vidur.allreduce_checks(noisy, vidur.allreduce_table(noisy), {"all": (0, 1e12)})
    (c,) = checks
    assert c.n == len(pts) and c.loo_within10 == pytest.approx(1 - 1 / len(pts))
    assert c.loo_worst == pytest.approx(2 / 3, rel=0.05)


def test_vectorised_gemm_matches_the_simulator():
    fit = catalog_kernel_fit("h100-sxm")
    assert fit is not None
    x = [getattr(fit, p[0]) for p in vidur._GEMM_PARAMS]
    m = np.array([1.0, 7.0, 100.0, 128.0, 129.0, 200.0, 300.0, 520.0, 4096.0])
    n = np.array([1536.0, 8192.0, 2560.0, 3072.0, 28672.0, 5120.0, 10240.0, 8192.0, 512.0])
    k = np.array([4096.0, 1024.0, 2560.0, 8192.0, 8192.0, 3456.0, 5120.0, 12288.0, 4096.0])
    v = vidur.gemm_time_vec(x, 989e12, 3.35e12, m, n, k)
    for i in range(len(m)):
        assert v[i] == pytest.approx(gemm_time_s(fit, 989e12, 3.35e12, m[i], n[i], k[i]))


def test_tile_choice():
    """Rows are padded to the cheapest tile: 128-row tiles (powers of two >= 16 below one
    tile), 64-row tiles at their fitted extra cost, 256-row tiles at their fitted gain."""
    from fleetsim.device.kernels import gemm_rows

    fit = catalog_kernel_fit("h100-sxm")
    assert fit is not None and fit.gemm_m_tile == 128
    c, g = fit.gemm_half_tile_cost, fit.gemm_double_tile_gain
    assert 0 < c < 1 and 0 < g < 0.5
    assert gemm_rows(fit, 1) == 16 and gemm_rows(fit, 17) == 32 and gemm_rows(fit, 100) == 128
    assert gemm_rows(fit, 128) == 128
    assert gemm_rows(fit, 129) == pytest.approx(min(192 * (1 + c), 256 * (1 - g)))
    assert gemm_rows(fit, 384) == pytest.approx(min(384.0, 512 * (1 - g)))
    assert gemm_rows(fit, 512) == pytest.approx(512 * (1 - g))
    # a profile without the tile fields keeps the single 128-row tile
    d = kernel_fit_to_dict(fit)
    for key in ("gemm_half_tile_cost", "gemm_double_tile_gain", "gemm_tile_half"):
        del d[key]
    old = kernel_fit_from_dict(d)
    assert [gemm_rows(old, m) for m in (1, 100, 129, 384, 512)] == [16, 128, 256, 384, 512]


def test_gemm_limits():
    """Memory-bound at one token (weights over bandwidth plus the launch), compute-bound and
    linear in tokens at many, padded to the 128-row tile."""
    fit = catalog_kernel_fit("h100-sxm")
    assert fit is not None
    peak, bw = 989e12, 3.35e12
    n, k = 28672.0, 8192.0
    t1 = gemm_time_s(fit, peak, bw, 1, n, k)
    # a GEMV streams the weights at close to the data-sheet bandwidth (measured: Qwen-72B's
    # 805 MB gate+up projection in 0.280 ms on H100 = 2.9 TB/s of 3.35)
    assert n * k * 2 / bw < t1 < 1.15 * n * k * 2 / bw
    big = gemm_time_s(fit, peak, bw, 8192, n, k)
    flops = 2 * 8192 * n * k
    rows = 8192 * (1 - fit.gemm_double_tile_gain)  # 256-row tiles
    shape = 1 + fit.gemm_n_half / n + fit.gemm_k_half / k + fit.gemm_tile_half / rows
    assert big == pytest.approx(flops * rows / 8192 / (peak * fit.gemm_eff_max) * shape, rel=0.05)
    assert gemm_time_s(fit, peak, bw, 129, n, k) > gemm_time_s(fit, peak, bw, 128, n, k)
    # int8/fp8 weights halve the memory-bound time
    t1q = gemm_time_s(fit, peak, bw, 1, n, k, weight_bytes_per_param=1.0)
    assert 0.5 * t1 < t1q < 0.65 * t1


def test_interp_table():
    t = ((1000.0, 10.0), (2000.0, 20.0), (4000.0, 30.0))
    assert interp_table(t, 500) == 10.0
    assert interp_table(t, 1500) == pytest.approx(15.0)
    assert interp_table(t, 3000) == pytest.approx(25.0)
    # beyond the end: slope of the last half of the range (2000 -> 4000: 5 per 1000)
    assert interp_table(t, 6000) == pytest.approx(40.0)


def test_derived_gpus_scale_allreduce_by_link_bandwidth():
    h100 = catalog_kernel_fit("h100-sxm")
    b200 = catalog_kernel_fit("b200")
    h200 = catalog_kernel_fit("h200")
    assert h100 and b200 and h200
    ratio = (
        catalog.gpu("b200")["link_bw_bytes_per_s"] / catalog.gpu("h100-sxm")["link_bw_bytes_per_s"]
    )
    assert ratio == 2.0
    th, tb = h100.allreduce_table(8), b200.allreduce_table(8)
    assert th and tb
    assert interp_table(tb, 64e6) == pytest.approx(interp_table(th, 32e6), rel=1e-9)
    assert h200.allreduce == h100.allreduce  # same NVLink 4
    assert catalog.kernels()["b200"]["provenance"] == "derived"
    assert "confidence L" in b200.source


def test_kernel_fit_roundtrip_and_bad_field():
    f = catalog_kernel_fit("a100-80gb")
    assert isinstance(f, KernelFit)
    assert kernel_fit_from_dict(kernel_fit_to_dict(f)) == f
    d = kernel_fit_to_dict(f)
    d["elem_norm"] = [1e-6]
    from fleetsim.base.errors import UserError

    with pytest.raises(UserError, match="elem_norm"):
        kernel_fit_from_dict(d)
    assert math.isfinite(f.gemm_launch_s)


def _vidur_copy(tmp_path: Path, gpu_dir: str = "h100") -> Path:
    import shutil

    root = tmp_path / "vidur"
    for org_model in ("meta-llama/Llama-2-7b-hf", "internlm/internlm-20b"):
        dst = root / "compute" / gpu_dir / org_model
        dst.mkdir(parents=True)
        shutil.copy(DATA / "compute" / "h100" / org_model / "mlp.csv", dst / "mlp.csv")
    (root / "network" / f"{gpu_dir}_dgx").mkdir(parents=True)
    shutil.copy(
        DATA / "network" / "h100_dgx" / "all_reduce.csv",
        root / "network" / f"{gpu_dir}_dgx" / "all_reduce.csv",
    )
    return root


def test_calibrate_from_vidur_writes_a_usable_profile(tmp_path, capsys):
    from fleetsim.apps.cli import main
    from fleetsim.config.loading import scenario_from_dict
    from fleetsim.config.resolve import resolve
    from fleetsim.device.profile import load_profile

    root = _vidur_copy(tmp_path)
    out = tmp_path / "h100.json"
    assert main(["calibrate", "--from-vidur", str(root), "--out", str(out)]) == 0
    assert "leave-one-model-out" in capsys.readouterr().out
    prof, _ = load_profile(out)
    assert prof.kernels is not None and prof.meta["catalog_gpu"] == "h100-sxm"
    assert prof.kernels.allreduce_table(4) is not None
    sc = {
        "model": {"name": "llama-3.1-8b"},
        "hardware": {"gpu": "h100-sxm", "profile": str(out)},
        "traffic": {"requests_per_day": 1000},
    }
    rs = resolve(scenario_from_dict(sc))
    base = resolve(scenario_from_dict({**sc, "hardware": {"gpu": "h100-sxm"}}))
    t_user = rs.latency_model().decode_time(32, 1000)
    t_cat = base.latency_model().decode_time(32, 1000)
    # fitted on two of the five shapes: the same GPU within a few percent
    assert t_user == pytest.approx(t_cat, rel=0.05)


def test_calibrate_from_vidur_unknown_gpu_folder(tmp_path, capsys):
    from fleetsim.apps.cli import main

    root = _vidur_copy(tmp_path, "mygpu")
    assert main(["calibrate", "--from-vidur", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--gpu" in err
    out = tmp_path / "p.json"
    assert (
        main(["calibrate", "--from-vidur", str(root), "--gpu", "h100-sxm", "--out", str(out)]) == 0
    )
    assert out.exists()


def test_calibrate_from_vidur_on_vidurs_two_gpu_layout(tmp_path, capsys, monkeypatch):
    """Vidur's own layout (compute/a100 and compute/h100): --gpu picks one folder by its name
    or its catalog name, --out is that file or a folder, and nothing is written into the
    working directory's profiles/ (the default is out/calibrate-vidur/)."""
    from fleetsim.apps.cli import main

    root = _vidur_copy(tmp_path, "h100")
    _vidur_copy(tmp_path, "a100")  # (the h100 operator times under Vidur's a100 folder name)
    monkeypatch.chdir(tmp_path)
    one = tmp_path / "h100.json"
    assert main(["calibrate", "--from-vidur", str(root), "--gpu", "h100", "--out", str(one)]) == 0
    assert json.loads(one.read_text())["catalog_gpu"] == "h100-sxm"
    capsys.readouterr()
    assert main(["calibrate", "--from-vidur", str(root), "--out", "x.json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--gpu" in err
    assert main(["calibrate", "--from-vidur", str(root), "--gpu", "b300"]) == 2
    assert "not one of" in capsys.readouterr().err
    # by its catalog name, to the default folder: out/calibrate-vidur/, never profiles/
    assert main(["calibrate", "--from-vidur", str(root), "--gpu", "a100-80gb"]) == 0
    assert os.listdir(tmp_path / "out/calibrate-vidur") == ["a100-80gb-vidur.json"]
    assert not (tmp_path / "profiles").exists()
