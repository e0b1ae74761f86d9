"""Optional compiled CPU kernel of the deformable-attention core (``csrc/ms_deform_attn_cpu.cpp``), built on first use.

The kernel is compiled with ``torch.utils.cpp_extension.load`` (OpenMP through ``at::parallel_for``) into a
cache directory outside the repository: ``$VIT_ADAPTER_EXT_DIR`` or ``~/.cache/vit_adapter/ext``, one subdirectory
per build key. The key hashes the source, the torch version, the compiler flags and the host CPU's instruction-set
flags (the build uses ``-march=native``), so a cache shared between hosts or torch versions never loads a wrong
binary. Concurrent first use is safe: ``cpp_extension`` holds an OS-level file lock on the build directory while it
builds (released by the kernel if the holder dies), and a second process then finds the finished build.

``load_kernel()`` returns the operator namespace or ``None``, and never raises: any failure (no compiler, no
ninja, a compile error) is logged once and the caller falls back to the pure-PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ms_deform_attn_cpu.cpp"
ENV_DIR = "VIT_ADAPTER_EXT_DIR"
# -fopenmp only at compile time: at::parallel_for's OpenMP region then binds to the libgomp that torch itself
# loaded (global symbols), so torch.set_num_threads applies and no second OpenMP runtime is started.
CFLAGS = ("-O3", "-march=native", "-fopenmp")


def cache_root() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vit_adapter" / "ext"


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (a -march=native binary is only valid where they match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(CFLAGS).encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def announce(message: str) -> None:
    """One visible line: through logging when the process configured it, else on stderr."""
    if logging.getLogger().hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


@functools.cache
def load_kernel() -> Any | None:
    """``torch.ops.<namespace>`` holding ``forward``/``backward``, or None when the kernel cannot be built/loaded."""
    try:
        return _build_and_load()
    except Exception as err:  # noqa: BLE001  any failure means "use the fallback"; the reason is logged
        first = str(err).strip().splitlines()
        announce(f"ms_deform_attn: compiled CPU kernel unavailable ({type(err).__name__}: {first[0] if first else ''})")
        return None


def _build_and_load() -> Any:
    if sys.platform == "win32":
        raise RuntimeError("the CPU kernel is built with gcc/clang flags; not supported on Windows")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH)")
    # Imported late (slow to import, only needed here). Its import warns that no CUDA runtime exists, which is
    # irrelevant to a CPU-only extension and would land in every training log: silenced for the import only.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(level)

    key = build_key()
    name = f"vit_adapter_deform_{key}"
    build_dir = cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=[*CFLAGS, f"-DVA_NAMESPACE={name}"],
        build_directory=str(build_dir),
        is_python_module=False,  # TORCH_LIBRARY operators: no pybind11, a much shorter compile
        verbose=False,
    )
    return getattr(torch.ops, name)
