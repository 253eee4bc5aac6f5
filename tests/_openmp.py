"""Imported by conftest before anything loads torch: OpenMP threads that wait for work passively.

By default torch's OpenMP threads (libgomp) spin for a while after every parallel region before they sleep. On
two cores that spinning holds the core that zarr's I/O thread, a second process or another engineer's run needs
next, and each of the thousands of small store reads and writes waits for it: one digits extraction took 3 to 6
times as long beside a second run (2.5 s passive, 8 to 18 s spinning). OMP_WAIT_POLICY is read once, when
libgomp loads (at `import torch`), hence this module; processes the tests start (`python -m pipeline`, dvc,
dask workers, the forkserver) inherit it. Only how idle threads wait changes, not how work is split: every
result is the same. A value set in the environment is kept."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
