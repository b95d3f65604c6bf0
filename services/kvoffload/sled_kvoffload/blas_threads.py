"""Thread count of numpy's OpenBLAS, which numpy itself cannot set at run time.

The CPU attention kernel runs one Python thread per core over sessions; if
every BLAS call also fanned out over all cores, the threads would fight over
the same cores and OpenBLAS' shared thread pool (measured here: up to 3x
slower for 5-row products). The setting is process-wide (OpenBLAS has no
per-thread count), so each ``CpuAttention`` holds it (``hold_single``) while
it lives and the count in force before the first holder comes back when the
last one releases. Where numpy uses another BLAS, nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading

import numpy as np

# (setter, getter) names: numpy's wheels prefix and suffix the OpenBLAS symbols.
_NAMES = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


@functools.cache
def _functions():
    pkg = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(os.path.dirname(pkg), "numpy.libs", "*openblas*"))
    paths += glob.glob(os.path.join(pkg, ".dylibs", "*openblas*"))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same instance
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                return setter, getter
    return None


def get_threads() -> int | None:
    fns = _functions()
    return None if fns is None else int(fns[1]())


def set_threads(count: int) -> int | None:
    """Set numpy's OpenBLAS thread count process-wide; return the previous one.

    None when numpy's BLAS is not a bundled OpenBLAS (nothing was changed).
    """
    if count < 1:
        raise ValueError(f"BLAS thread count must be >= 1, got {count}")
    fns = _functions()
    if fns is None:
        return None
    previous = int(fns[1]())
    fns[0](count)
    return previous


_lock = threading.Lock()
_holders = 0
_restore: int | None = None


def hold_single() -> None:
    """Make numpy's BLAS single-threaded until the matching ``release_single``."""
    global _holders, _restore
    with _lock:
        if _holders == 0:
            _restore = set_threads(1)
        _holders += 1


def release_single() -> None:
    global _holders, _restore
    with _lock:
        if _holders == 0:
            raise RuntimeError("release_single without hold_single")
        _holders -= 1
        if _holders == 0 and _restore is not None:
            set_threads(_restore)
            _restore = None
