"""The compiled CPU kernels' extension: build it (C++, on first use), load it, say why it did not.

The kernels themselves register in :mod:`prunus.kernels.backends` (``cpu_compiled`` and the
``torch_sparse`` fallbacks); their array formats are in :mod:`prunus.kernels.cpu_formats`.
The kernels:

- ``cpu_csr``: CSR with uint16 column indices (int32 past 65536 inputs) and rows padded to a multiple
  of 8 non-zeros; a C++ SpMV for one token and a token-tiled SpMM for several. Any pattern.
- ``cpu_bitmap``: one bit per weight plus the kept values, expanded 8 at a time with an AVX2
  permute; reads less than dense or CSR at 50-80% sparsity. Any pattern.
- ``cpu_bsr``: blocks of R x C weights with register blocking over the block's rows. Block patterns.
- ``torch_csr`` / ``torch_bsr``: ``torch.sparse`` CSR/BSR matmul; always available, usually slower.
- the integer kernels (``csrc/cpu_quant.cpp`` and ``csrc/cpu_csr_q8.cpp``,
  :mod:`prunus.kernels.backends.cpu_quant`) and the decode kernels that skip zero inputs
  (``csrc/cpu_actskip.cpp``, :mod:`prunus.kernels.backends.cpu_actskip`) are built into the same
  extension.

The C++ source (``csrc/cpu_sparse.cpp``) is compiled by ``torch.utils.cpp_extension.load`` (needs
``ninja`` and a C++ compiler) into torch's extension cache, once per machine and source version:
``bash scripts/build_kernels.sh`` does it ahead of time. It is
built for AVX2+FMA where torch reports that the CPU has them (``-mavx2 -mfma``, not
``-march=native``), and for the baseline ISA elsewhere. If the build fails, importing still works,
the compiled kernels report themselves unavailable, and ``auto`` picks the fallback.

Set ``PRUNUS_NO_COMPILE=1`` to never build or load the extension.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cpu_sparse.cpp"
SOURCES = (SOURCE, CSRC / "cpu_quant.cpp", CSRC / "cpu_actskip.cpp",
           CSRC / "cpu_csr_q8.cpp")  # each includes common.h
COMPILED = ("cpu_csr", "cpu_bitmap", "cpu_bsr", "cpu_int8", "cpu_int4", "cpu_bitmap_int8",
            "cpu_int8_a8", "cpu_bitmap_int8_a8", "cpu_int4_a8", "cpu_skip_f32", "cpu_skip_int8",
            "cpu_skip_int4", "cpu_skip_bitmap_int8", "cpu_csr_int8")
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2")

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": None, "error": None, "seconds": None, "isa": None}


# ------------------------------------------------------------------------------------------------
# Building and loading the extension


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa() -> tuple[str, list[str]]:
    """The build variant for this CPU, detected when the extension is built:
    ``("avx512vnni", [...])`` / ``("avx512", [...])`` where the CPU has AVX-512 F/BW/VL/DQ and
    VBMI2 (the byte expand the int8 bitmap kernel uses), with or without VNNI (the W8A8 kernels), ``("avx2", ["-mavx2", "-mfma", "-mpopcnt"])`` where it has AVX2 and FMA,
    else ``("base", [])`` (portable loops). ``PRUNUS_ISA=avx2|base`` asks for a lower one."""
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or cap not in ("AVX2", "AVX512"):
        return "base", []
    want = os.environ.get("PRUNUS_ISA", "")
    if want == "base":
        return "base", []
    avx2 = ["-mavx2", "-mfma", "-mpopcnt"]
    flags = cpu_flags()
    if want != "avx2" and cap == "AVX512" and set(AVX512_FLAGS) <= flags:
        avx512 = avx2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi2"]
        if "avx512_vnni" in flags:  # the W8A8 kernels' vpdpbusd
            return "avx512vnni", avx512 + ["-mavx512vnni"]
        return "avx512", avx512
    return "avx2", avx2


def _with_ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; the PyPI package puts it next to the interpreter,
    # which is not on PATH when .venv/bin/python is called directly.
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def load_extension(verbose: bool = False) -> bool:
    """Build (if needed) and load the compiled kernels; True when ``torch.ops.prunus_cpu`` works.

    Tried once per process; a failure is remembered (see :func:`unavailable_reason`) and warned
    about once. Thread-safe; concurrent processes share torch's build lock.
    """
    with _lock:
        if _state["loaded"] is not None:
            return bool(_state["loaded"])
        if os.environ.get("PRUNUS_NO_COMPILE", "") not in ("", "0"):
            _state.update(loaded=False, error="disabled by PRUNUS_NO_COMPILE")
            return False
        variant, flags = isa()
        start = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            _with_ninja_on_path()
            cpp_extension.load(
                name=f"prunus_cpu_{variant}",
                sources=[str(p) for p in SOURCES],
                extra_cflags=["-O3", *flags, "-ffp-contract=fast", "-fopenmp"],
                extra_ldflags=["-fopenmp"],  # torch's own libgomp is already loaded: one pool
                is_python_module=False,
                verbose=verbose,
            )
            torch.ops.prunus_cpu.isa()
        except Exception as e:  # noqa: BLE001  (any build failure means: use the fallback)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            msg = f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()
            _state.update(loaded=False, error=msg)
            warnings.warn(f"prunus: compiled CPU kernels unavailable ({msg}); using the PyTorch "
                          f"sparse fallback", RuntimeWarning, stacklevel=2)
            return False
        _state.update(loaded=True, error=None, seconds=time.perf_counter() - start,
                      isa=str(torch.ops.prunus_cpu.isa()))
        _register_fakes()
        return True


def _register_fakes() -> None:
    """Shape functions of the ops, so that ``torch.compile`` can trace a model that calls them
    (each op returns a new (N, out) float32 tensor)."""
    def out_of(name: str, rows):  # type: ignore[no-untyped-def]
        def fake(x, *args):  # type: ignore[no-untyped-def]
            return x.new_empty((x.shape[0], rows(args)))
        torch.library.register_fake(f"prunus_cpu::{name}")(fake)

    for name in ("csr_linear", "bsr_linear", "bitmap_linear"):
        out_of(name, lambda a: a[-2])  # (..., bias, out_features, in_features)
    for name in ("q8_linear", "q4_linear", "q8a8_linear", "q4a8_linear"):
        out_of(name, lambda a: a[0].shape[0])  # codes / packed (out, ...)
    for name in ("bitmap_q8_linear", "bitmap_q8a8_linear"):
        out_of(name, lambda a: a[1].shape[0])  # (val_ptr, bits (out, words), ...)
    out_of("csr_q8_linear", lambda a: a[0].shape[0] - 1)  # (row_ptr (out + 1), ...)
    # (..., out_features[, threshold, scale]): out_features by its place after x
    for name, at in (("skip_f32_linear", 2), ("skip_q8_linear", 5), ("skip_q4_linear", 5),
                     ("skip_bitmap_q8_linear", 6)):
        out_of(name, lambda a, at=at: a[at])

    def decoded(first, *args):  # type: ignore[no-untyped-def]  # the (in, ldw) float32 W^T
        ldw = first.shape[1] * (2 if first.dtype == torch.uint8 else 1)
        return first.new_empty((first.shape[0], ldw), dtype=torch.float32)

    for name in ("skip_q8_dense", "skip_q4_dense"):
        torch.library.register_fake(f"prunus_cpu::{name}")(decoded)

    def decoded_b8(wptr, bits, *args):  # type: ignore[no-untyped-def]
        return bits.new_empty((bits.shape[0], bits.shape[1] * 64), dtype=torch.float32)

    torch.library.register_fake("prunus_cpu::skip_bitmap_q8_dense")(decoded_b8)


def compiled_available() -> bool:
    """Whether the compiled CPU kernels can run here (builds them on the first call)."""
    return load_extension()


def unavailable_reason() -> str:
    """Why the compiled kernels are unavailable ('' when they are loaded)."""
    load_extension()
    return str(_state["error"] or "")


def build_info() -> dict[str, object]:
    """Build status: loaded, error, seconds (build or cache load), isa (e.g. ``avx2+fma``)."""
    load_extension()
    return dict(_state)


def main(argv: Optional[list[str]] = None) -> int:
    """Build the extension now and say how it went; 1 if it cannot (``scripts/build_kernels.sh``)."""
    argv = sys.argv[1:] if argv is None else argv
    ok = load_extension(verbose="-v" in argv or "--verbose" in argv)
    info = dict(_state)
    if ok:
        print(f"prunus: compiled CPU kernels ready ({info['isa']}, {info['seconds']:.1f} s)")
        return 0
    print(f"prunus: compiled CPU kernels unavailable: {info['error']}", file=sys.stderr)
    return 1

