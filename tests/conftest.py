"""One torch thread for the whole suite (and the scripts it starts): the tests' tiny models spend their time in
small operations, where a second thread costs more than it saves (measured on a 2-core CPU: 121 s of CPU and 138 s
of wall-clock against 237 s and 190 s with 2 threads, for test_credit, test_gradients and test_long_runs).
A user's OMP_NUM_THREADS is kept."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
