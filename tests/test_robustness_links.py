"""Nothing fleetsim writes or locks in an output folder follows a link (issue #23, high 1).

A symbolic link, a hard link, a FIFO or a folder placed at ``.fleetsim-lock`` is refused in one
line and its target keeps its bytes; ``--force`` deletes only names fleetsim itself writes,
whatever ``.fleetsim-manifest.json`` lists; the manifest and the report's ``flat-day.json`` are
read without following a link, and a cache that is not a key-matching finite cost is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fleetsim.apps import cli, report
from fleetsim.results import output

SCEN = """
name = "link-test"
seed = 2
[simulation]
hours = 1
[model]
name = "llama-3.1-8b"
[hardware]
gpu = "h100-sxm"
[fleet]
replicas = 2
[traffic]
requests_per_day = 20000
diurnal = "flat"
prompt = { dist = "fixed", value = 50 }
output = { dist = "fixed", value = 20 }
"""

PRECIOUS = b"precious\n"


def _cli(capsys, *args):
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, [x for x in cap.err.splitlines() if x.strip()]


def _scenario(tmp_path: Path) -> Path:
    f = tmp_path / "s.toml"
    f.write_text(SCEN)
    return f


def _plant(kind: str, lock: Path, victim: Path) -> None:
    """Put ``kind`` at ``lock`` (the victim file is outside the folder)."""
    if kind == "symlink":
        lock.symlink_to(os.path.relpath(victim, lock.parent))
    elif kind == "dangling-symlink":
        lock.symlink_to(lock.parent / "nowhere" / "x")
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "directory":
        lock.mkdir()
        (lock / "inside").write_bytes(PRECIOUS)
    else:  # pragma: no cover
        raise AssertionError(kind)


KINDS = ["symlink", "dangling-symlink", "hardlink", "fifo", "directory"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", KINDS)
def test_lock_file_never_followed_by_run(tmp_path, capsys, kind, force):
    """`fleetsim run` into a folder whose .fleetsim-lock is a link, a FIFO or a folder: one
    line naming the lock, exit 2, the victim's bytes unchanged, nothing written. (Before: a
    symlink or hard link exited 0 and the victim held a pid.)"""
    f = _scenario(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    lock = out / output.LOCK_NAME
    _plant(kind, lock, victim)
    args = ["run", f, "--out", out, "--quiet"] + (["--force"] if force else [])
    rc, err = _cli(capsys, *args)
    assert rc == 2 and len(err) == 1, err
    assert output.LOCK_NAME in err[0] and "Traceback" not in err[0], err
    assert victim.read_bytes() == PRECIOUS
    if kind == "directory":
        assert (lock / "inside").read_bytes() == PRECIOUS
    assert sorted(p.name for p in out.iterdir()) == [output.LOCK_NAME]  # nothing written
    assert os.path.lexists(lock)  # the planted thing is left for the user to look at


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_lock_file_never_followed_by_report(tmp_path, capsys, kind):
    """`fleetsim report DIR` takes the same lock: refused in one line, victim unchanged."""
    f = _scenario(tmp_path)
    out = tmp_path / "out"
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 0, err
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _plant(kind, out / output.LOCK_NAME, victim)
    rc, err = _cli(capsys, "report", out, "--no-flat")
    assert rc == 2 and len(err) == 1 and output.LOCK_NAME in err[0], err
    assert victim.read_bytes() == PRECIOUS
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != output.LOCK_NAME}
    assert after == before


def test_a_stale_regular_lock_is_taken_and_removed(tmp_path, capsys):
    """A regular one-link lock file left by a killed run is fleetsim's: taken, then removed."""
    f = _scenario(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / output.LOCK_NAME).write_text("999999")
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 0, err
    assert not os.path.lexists(out / output.LOCK_NAME)


def test_force_ignores_a_manifest_listing_a_users_file(tmp_path, capsys):
    """A manifest edited to list the user's own files (and a path outside the folder) does not
    make --force delete them; fleetsim's own names are still replaced. (Before: deleted.)"""
    f = _scenario(tmp_path)
    out = tmp_path / "out"
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet")
    assert rc == 0, err
    (out / "thesis.tex").write_bytes(PRECIOUS)
    (out / "notes.png").write_bytes(PRECIOUS)
    (out / "trace.csv").write_bytes(PRECIOUS)  # listed: replay's name, so it is fleetsim's
    (out / output.MANIFEST_NAME).write_text(
        json.dumps({"files": ["thesis.tex", "notes.png", "../victim", "hourly.parquet"]})
    )
    assert output.previous_outputs(out) == [output.MANIFEST_NAME, "hourly.parquet"]
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet", "--force", "--seed", "5")
    assert rc == 0, err
    assert (out / "thesis.tex").read_bytes() == PRECIOUS
    assert (out / "notes.png").read_bytes() == PRECIOUS
    assert (out / "trace.csv").read_bytes() == PRECIOUS
    assert output.remove_previous_outputs(out) == [output.MANIFEST_NAME, "hourly.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.png", "thesis.tex", "trace.csv"]


def test_manifest_that_is_a_link_is_not_read(tmp_path):
    """A manifest that is a symbolic link (to a list naming trace.csv) counts as empty."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "m.json"
    elsewhere.write_text(json.dumps({"files": ["trace.csv"]}))
    (out / "trace.csv").write_bytes(PRECIOUS)
    (out / output.MANIFEST_NAME).symlink_to(elsewhere)
    assert output.previous_outputs(out) == [output.MANIFEST_NAME]  # the link itself only
    (out / output.MANIFEST_NAME).unlink()
    os.link(elsewhere, out / output.MANIFEST_NAME)
    assert "trace.csv" not in output.previous_outputs(out)


def test_every_name_a_command_writes_is_fleetsims(tmp_path):
    """--force's list of fleetsim's names covers every file the commands write (a new figure or
    file that is not added there would never be replaced)."""
    from fleetsim.calibrate.replay import REPLAY_FILES

    for n in (*report.REPORT_FILES, *report.CROSSOVER_FILES):
        assert output.could_write(n), n
    for n in REPLAY_FILES:
        assert output.could_write(n, listed=True), n
    assert not output.could_write("trace.csv")
    assert not output.could_write("notes.txt", listed=True)


def test_stage_and_atomic_writes_never_follow_links(tmp_path):
    """A link planted at a final name is replaced, not written through; the staging folder is
    made fresh (mode 0700) and a replaced one is refused at commit."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "peak.json").symlink_to(victim)
    output.write_text_atomic("{}\n", out / "peak.json")
    assert victim.read_bytes() == PRECIOUS and not (out / "peak.json").is_symlink()
    os.link(victim, out / "report.md")
    output.write_text_atomic("# r\n", out / "report.md")
    assert victim.read_bytes() == PRECIOUS and (out / "report.md").read_text() == "# r\n"

    o = output.RunOutput(out, mode="add", names=("cost.png",)).open()
    assert o.stage is not None and (o.stage.stat().st_mode & 0o777) == 0o700
    output.write_bytes_atomic(b"png", o.path("cost.png"))
    real = o.stage.with_name(o.stage.name + "-moved")
    o.stage.rename(real)
    o.stage.symlink_to(real)  # someone swapped the staging folder for a link
    with pytest.raises(output.UserError, match="staging folder"):
        o.commit()
    assert not (out / "cost.png").exists()
    assert not os.path.lexists(out / output.LOCK_NAME)


@pytest.mark.parametrize(
    "content",
    [
        "[]",
        "null",
        '"x"',
        "42",
        '{"key": null}',
        "{not json",
        '{"key": "K", "flat_day_cost_usd": -1e308}',
        '{"key": "K", "flat_day_cost_usd": 1e308}',
        '{"key": "K", "flat_day_cost_usd": -5}',
        '{"key": "K", "flat_day_cost_usd": true}',
        '{"key": "K", "flat_day_cost_usd": "12"}',
        '{"key": "K", "flat_day_cost_usd": 1e999}',
        '{"key": "K", "flat_day_cost_usd": NaN}',
        '{"key": ["K"], "flat_day_cost_usd": 12.5}',
    ],
)
def test_report_cache_is_trusted_only_when_sane(tmp_path, content):
    """flat-day.json holding [], null, "x" (AttributeError before), or the right key with a
    cost of -1e308 (trusted before: "$1e308" and "inf%"), negative, boolean, text, infinite or
    NaN: unreadable, so the day is simulated again."""
    p = tmp_path / report.FLAT_FILE
    p.write_text(content.replace("K", "k" * 64))
    assert report._cached_flat(p, "k" * 64) is None
    p.write_text(json.dumps({"key": "k" * 64, "flat_day_cost_usd": 12.5}))
    assert report._cached_flat(p, "k" * 64) == 12.5
    assert report._cached_flat(p, "j" * 64) is None


def test_report_cache_that_is_a_link_is_not_read(tmp_path):
    """A flat-day.json that is a symbolic link or has a second hard link is not trusted."""
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"key": "k" * 64, "flat_day_cost_usd": 12.5}))
    p = tmp_path / "out" / report.FLAT_FILE
    p.parent.mkdir()
    p.symlink_to(real)
    assert report._cached_flat(p, "k" * 64) is None
    p.unlink()
    os.link(real, p)
    assert report._cached_flat(p, "k" * 64) is None


def test_report_with_a_hostile_cache_resimulates(tmp_path, capsys):
    """`fleetsim report DIR` over a flat-day.json of [] (AttributeError before) and one with
    the run's own key and -1e308 (printed $1e308 and inf% before): the flat day is simulated
    again and the page shows a finite figure."""
    f = _scenario(tmp_path)
    out = tmp_path / "out"
    rc, err = _cli(capsys, "run", f, "--out", out, "--quiet", "--report")
    assert rc == 0, err
    good = json.loads((out / report.FLAT_FILE).read_text())
    peak = json.loads((out / "peak.json").read_text())
    for bad in ("[]", json.dumps({**good, "flat_day_cost_usd": -1e308})):
        (out / report.FLAT_FILE).write_text(bad)
        rc, err = _cli(capsys, "report", out)
        assert rc == 0, err
        again = json.loads((out / "peak.json").read_text())
        assert again["flat_day_cost_usd"] == pytest.approx(peak["flat_day_cost_usd"], rel=1e-12)
        assert again["flat_source"] == "re-simulated"
        md = (out / "report.md").read_text()
        assert "inf%" not in md and "1e+308" not in md and "1e308" not in md
        assert json.loads((out / report.FLAT_FILE).read_text()) == good
