"""What the bench/ scripts share: the machine facts of a result file, atomic JSON writing, the data
flags (``--model --calib --eval --nsamples --seqlen --windows``) and the environment of a child
``python -m prunus`` run.

Only the standard library is imported here at module level: the peer scripts (``peer_*.py``) run in
their own virtual environments, which may lack prunus or torch. Every script imports this module the
same way, which works for ``python bench/X.py`` from any folder and for tests that load a script by
its path::

    ROOT = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(ROOT))
    from bench._common import machine, write_json  # noqa: E402
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent

# The SIMD flags that matter to the kernels, in this order in ``machine()["flags"]``.
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
         "avx512_vbmi2", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
         "amx_int8", "amx_bf16")


def machine(*, kernel_isa: bool = False) -> dict[str, Any]:
    """Facts about this machine for a result file, the union of what the scripts have written.

    Keys: ``cpu`` (model name from /proc/cpuinfo), ``cpuid`` (its ``cpu_family``, ``model`` and
    ``stepping``: a VM's model name can hide the generation, e.g. AMD family 25 is Zen 3/4, 26 Zen 5), ``flags`` (the :data:`FLAGS` it has), ``cores``
    and ``cpus`` (both ``os.cpu_count()``), ``l3_mb`` (int) and ``l3_mib`` (float, the last-level
    cache; None without prunus), ``load_avg_1m_at_start`` and ``loadavg_1_5_15`` (contention),
    ``platform``, ``python``, ``torch`` (None without torch), ``date``; with ``kernel_isa=True``
    also ``kernel_isa``, the ISA prunus's compiled CPU kernels were built for (this loads, and if
    need be builds, the extension, so it is asked for only by scripts that use the kernels anyway).
    """
    model, flags, family = "", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.split(":")[0].strip() in ("cpu family", "model", "stepping"):
                family.setdefault(line.split(":")[0].strip().replace(" ", "_"), line.split(":", 1)[1].strip())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    l3: Optional[int] = None
    if torch is not None:
        try:
            from prunus.kernels.timing import _last_level_cache_bytes

            l3 = _last_level_cache_bytes(torch.device("cpu"))
        except ImportError:
            pass
    out: dict[str, Any] = {
        "cpu": model, **({"cpuid": family} if family else {}),
        "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
        "cpus": os.cpu_count(), "l3_mb": None if l3 is None else l3 >> 20,
        "l3_mib": None if l3 is None else l3 / (1 << 20),
        "load_avg_1m_at_start": load[0] if load else None, "loadavg_1_5_15": load,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None), "date": time.strftime("%Y-%m-%d")}
    if kernel_isa:
        from prunus.kernels import cpu as kcpu

        out["kernel_isa"] = kcpu.build_info().get("isa")
    return out


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 1,
               default: Optional[Callable[[Any], Any]] = None) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path``, atomically.

    A temporary file in the same folder (created with the folder if need be), then ``os.replace``;
    the temporary file is removed if anything fails. A path that exists but is not a regular file
    (``/dev/stdout``, a pipe) is written straight, since a rename would replace it.
    ``indent`` and ``default`` go to ``json.dump`` (each script keeps the layout it always wrote).
    """
    p = Path(path)
    text = json.dumps(obj, indent=indent, default=default) + "\n"
    if p.exists() and not p.is_file():
        with open(p, "w") as fh:
            fh.write(text)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_data_args(parser: argparse.ArgumentParser, *, model: Optional[str] = "smollm2-135m",
                  calib: Optional[str] = "book:emma", eval: Optional[str] = "book:pride",
                  nsamples: Optional[int] = 32, seqlen: Optional[int] = 512,
                  windows: Optional[int] = 64) -> argparse.ArgumentParser:
    """Add the data flags with these defaults: ``--model``, ``--calib`` (calibration text),
    ``--eval`` (evaluation text), ``--nsamples`` (calibration windows), ``--seqlen`` (tokens a
    window) and ``--windows`` (evaluation windows). A default of None leaves that flag out (a script
    that has no such setting). Returns ``parser``."""
    if model is not None:
        parser.add_argument("--model", default=model)
    if calib is not None:
        parser.add_argument("--calib", default=calib, help="calibration text (prunus.io.data.resolve_text)")
    if eval is not None:
        parser.add_argument("--eval", default=eval, help="evaluation text (prunus.io.data.resolve_text)")
    if nsamples is not None:
        parser.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    if seqlen is not None:
        parser.add_argument("--seqlen", type=int, default=seqlen, help="tokens a window")
    if windows is not None:
        parser.add_argument("--windows", type=int, default=windows, help="evaluation windows")
    return parser


def child_env() -> dict[str, str]:
    """The environment of a child ``python -m prunus`` run: this checkout first on PYTHONPATH,
    Hugging Face offline, no progress bars."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}


def add_timing_args(parser: Any, rounds: int = 5) -> Any:
    """The flags of the interleaved timing scripts (``actskip_e2e``, ``plan_ab``, ``llamacpp_ab``):
    ``--rounds``, ``--prompt-tokens`` (128), ``--new-tokens`` (32), ``--threads`` (2), ``--json``."""
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (medians are reported)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    return parser

