"""SLED verifier service."""

import os

# OpenMP threads that spin while waiting starve each other when the host's cores are
# shared with other busy processes (measured: a 2-thread decode step went from ~55 ms
# to ~500 ms). Sleeping waiters cost little when the host is idle. libgomp reads this
# once, when torch loads it, so it must be set before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
