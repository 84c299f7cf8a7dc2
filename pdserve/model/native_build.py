"""Build, cache and load one C source file as a shared library, for the native CPU kernels.

Why plain C through ctypes, not a torch C++ extension: `torch.utils.cpp_extension` compiles
against torch's headers for about a minute in every fresh clone; one small file builds with the
system compiler in about a second. The library is cached under a name that hashes the source,
the flags, the compiler and the CPU (it is built for this CPU: -march=native), and is written to
a temporary file and renamed into place, so processes building it at the same time
(pytest-xdist, several workers) each see either nothing or a whole library.

OpenMP: the library links `libgomp.so.1`, the soname torch's own OpenMP runtime is loaded
under, so the loader reuses torch's runtime and its thread pool (no second pool competing for
the cores).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve" / "native"


def cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def build(source: Path, compile_flags: tuple[str, ...], link_flags: tuple[str, ...],
          includes: tuple[Path, ...] = ()) -> ctypes.CDLL | str:
    """`source` compiled and loaded, or why it cannot be had (a string). Callers cache the result.
    `includes`: the files `source` #includes, hashed into the cache name with it."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc or gcc) on PATH"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc} --version failed: {e}"
    key = hashlib.sha256("\0".join([source.read_text(), *(f.read_text() for f in includes), *compile_flags, *link_flags, version, cpu_id()]).encode()
                         ).hexdigest()[:16]
    lib = cache_dir() / f"{source.stem}-{key}.so"
    if not lib.exists():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
            os.close(fd)
            obj = tmp[: -len(".so.tmp")] + ".o"
            try:
                for cmd in ([cc, *compile_flags, "-c", str(source), "-o", obj], [cc, *link_flags, obj, "-o", tmp, "-lm"]):
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if r.returncode != 0:
                        return f"{cc} failed: {r.stderr.strip()[-500:]}"
                os.replace(tmp, lib)  # atomic: a concurrent builder's rename wins, same bytes
            finally:
                for f in (tmp, obj):
                    if os.path.exists(f):
                        os.unlink(f)
        except (OSError, subprocess.SubprocessError) as e:
            return f"building {lib} failed: {e}"
    try:
        return ctypes.CDLL(str(lib))
    except OSError as e:
        return f"loading {lib} failed: {e}"


def label(name: str) -> AbstractContextManager[object]:
    """A named range for torch.profiler traces (ctypes calls are no aten ops), only while one runs:
    an idle `record_function` still costs ~12 us, and the linear kernel runs ~33 times a step."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else nullcontext()
