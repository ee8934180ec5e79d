"""Native CPU kernels built with the system C compiler on first use and loaded by ctypes: the paged decode kernel
(csrc/paged_decode.c) here, and the fused elementwise kernels of layers/cpu_fused.py (``build_library``).

Each shared object lives in ``$SLUICE_CACHE_DIR`` (default ``~/.cache/sluice/cpu_kernels/``) under a name keyed by a
hash of the source, the compiler command and the CPU's flags, so a changed source or another machine builds its own;
it is compiled to a temporary name and renamed into place, so processes starting together never load a half-written
file. It links libgomp.so.1 by soname: the one torch already loaded serves it (one OpenMP runtime per process).

``load_paged_decode()`` returns None, after one info line, when there is no compiler or the build fails: the caller
then keeps its SDPA path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
COMPILER = os.environ.get("CC", "cc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK_SIZE = 256, 16, 256  # the kernel's stack buffers (paged_decode.c)

_ARGTYPES = (
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # out, query, kv_cache, block_table
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # rows, seq_lens, tokens, num_reqs
    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # num_heads, num_kv_heads, head_dim, block_size
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # num_blocks, table, query, out strides
    ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,  # q_dtype, kv_dtype, scale, v_scale
    ctypes.c_int, ctypes.c_float, ctypes.c_int)  # window (0: none), soft_cap (0: none), num_threads

_loaded: dict[str, object] = {}  # compiler -> the kernel function, or None once it could not be built


def cache_dir() -> Path:
    return Path(os.environ.get("SLUICE_CACHE_DIR") or Path.home() / ".cache" / "sluice") / "cpu_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def library_path(compiler: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    key = hashlib.sha256(source.read_bytes() + " ".join((compiler,) + flags).encode() + _cpu_flags().encode())
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, str(source)], check=True, capture_output=True, timeout=60)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_library(source: Path, what: str, fallback: str, compiler: str | None = None,
                  flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """``source`` compiled (or found in the cache) and loaded; None, after one info line naming ``what`` is
    unavailable and the ``fallback`` taken, when there is no compiler or the build fails."""
    compiler = compiler or COMPILER
    try:
        if shutil.which(compiler) is None:
            raise FileNotFoundError(f"no C compiler {compiler!r} on PATH")
        path = library_path(compiler, source, flags)
        if not path.exists():
            _build(compiler, path, source, flags)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr.decode(errors="replace")[-500:] if isinstance(exc, subprocess.CalledProcessError) else exc
        logger.info("%s unavailable (%s): %s", what, detail, fallback)
        return None


def load_paged_decode(compiler: str | None = None):
    """The C function ``sluice_paged_decode`` (ctypes, argtypes set), or None when it cannot be built."""
    compiler = compiler or COMPILER
    if compiler in _loaded:
        return _loaded[compiler]
    library = build_library(SOURCE, "CPU paged decode kernel", "decodes use SDPA", compiler)
    fn = None
    if library is not None:
        fn = library.sluice_paged_decode
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    _loaded[compiler] = fn
    return fn
