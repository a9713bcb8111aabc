"""The ML.ENERGY benchmark's ``gpu_model`` values as catalog GPUs (``fleetsim calibrate
--from-mlenergy``, the accuracy harness).

The benchmark writes ``gpu_model`` as the short name its job configuration used
(data/mlenergy-v3/SOURCE.md: ``H100``, ``B200``; its ``configs/vllm/<task>/<org>/<model>/<GPU>/``
folders also have ``H200``). A user's own run may write another spelling (``A100-SXM4-80GB``,
``NVIDIA H100 80GB HBM3``). The rule, on the catalog's own names (``catalog/gpus.toml``: the
id, e.g. ``a100-80gb``, and its ``description``, e.g. "NVIDIA A100 SXM 80GB"):

1. the catalog id itself, any case (``h100-sxm``, ``A100-80GB``);
2. else the name's words (split at spaces, ``-`` and ``_``; any case; "NVIDIA" and the memory
   type ``HBM*`` ignored; ``SXM4`` / ``SXM5`` read as ``SXM``; ``80 GB`` / ``80G`` as ``80gb``):
   the first is the chip, which must be the first word of the id (``h100`` of ``h100-sxm``);
   every further word (a form factor ``SXM`` / ``PCIe`` / ``NVL``, a memory size ``80GB``) must
   be a word of the id or of the description. ``H100-PCIe`` therefore matches nothing (the
   catalog's H100 is the SXM board: another TDP), and ``A100`` would be refused as ambiguous
   if the catalog had an A100 40 GB beside the 80 GB (it has not).

Exactly one catalog GPU left: that one. None: the row is skipped, the reason naming the value,
the accepted names and the fix. Several: skipped, the reason naming the choices (the rows'
model sizes or memory do not pick one: the KV budget the fit needs depends on the memory).

A matched row's ``gpu_model`` is read as the catalog GPU's benchmark name (:data:`GPUS`: the
chip, upper case, ``H100`` for ``h100-sxm``), so that the fit's GPU-specific rules (the
B200's Blackwell kernels and its host-limited one-GPU series) hold whatever the spelling.
"""

from __future__ import annotations

import re
from functools import cache

from fleetsim.device import catalog


def _words(s: str) -> list[str]:
    s = re.sub(r"(\d+)\s*(?:gib|gb|g)\b", r"\1gb", s.lower())
    out = []
    for w in re.split(r"[\s_\-/]+", s):
        if not w or w == "nvidia" or w.startswith("hbm"):
            continue
        out.append("sxm" if re.fullmatch(r"sxm\d*", w) else w)
    return out


def _chip(gpu_id: str) -> str:
    return _words(gpu_id)[0]


@cache
def benchmark_names() -> dict[str, str]:
    """``{benchmark name: catalog id}`` of every catalog GPU: its chip upper case (``H100``),
    or the id upper case where two catalog GPUs share the chip."""
    ids = sorted(catalog.gpus())
    chips = [_chip(g) for g in ids]
    return {(c if chips.count(c) == 1 else g).upper(): g for g, c in zip(ids, chips, strict=True)}


#: the benchmark's GPU names as catalog names (every catalog GPU; :func:`benchmark_names`)
GPUS: dict[str, str] = benchmark_names()
#: a catalog id's benchmark name
NAME_OF: dict[str, str] = {v: k for k, v in GPUS.items()}


def candidates(name: str, gpus: dict[str, dict] | None = None) -> list[str]:
    """The catalog ids (of ``gpus``: the catalog's by default) that ``name`` may mean by the
    module's rule, sorted."""
    table = catalog.gpus() if gpus is None else gpus
    low = name.strip().lower()
    if low in table:
        return [low]
    w = _words(name)
    if not w:
        return []
    out = []
    for g, e in table.items():
        own = set(_words(g)) | set(_words(str(e.get("description", ""))))
        if _chip(g) == w[0] and set(w[1:]) <= own:
            out.append(g)
    return sorted(out)


@cache
def resolve(name: str) -> tuple[str | None, str]:
    """``(catalog id, '')`` of benchmark ``gpu_model`` value ``name``, or ``(None, reason)``:
    the one-line reason a row of it is skipped, naming the value and the fix."""
    found = candidates(name)
    if len(found) == 1:
        return found[0], ""
    if found:
        return None, (
            f"gpu_model {name!r}: could be catalog GPUs {', '.join(found)} (fix: write one of "
            f"them as gpu_model)"
        )
    return None, (
        f"gpu_model {name!r}: no catalog GPU (known: "
        + ", ".join(f"{k} = {v}" for k, v in GPUS.items())
        + "; fix: one of these names, a catalog id, or the chip with words of its "
        "description, e.g. A100-SXM4-80GB; a GPU not listed needs its entry in "
        "simulator/device/catalog/gpus.toml first)"
    )


def benchmark_name(name: str) -> str:
    """``name`` as its catalog GPU's benchmark name (:data:`GPUS`), or ``name`` itself where it
    matches no catalog GPU or several (:func:`resolve` says why)."""
    g, _ = resolve(name)
    return name if g is None else NAME_OF[g]
