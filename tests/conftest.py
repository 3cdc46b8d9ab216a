"""What the whole suite shares.

One torch thread (and for the scripts it starts): the tests' tiny models spend their time in small operations,
where a second thread costs more than it saves (measured on a 2-core CPU: 121 s of CPU and 138 s of wall-clock
against 237 s and 190 s with 2 threads, for test_credit, test_gradients and test_long_runs). A user's
OMP_NUM_THREADS is kept.

Every test file and every test starts from the same random streams (Python's and torch's), whatever ran before it
in its process: pytest-xdist gives each worker a different set of files from run to run.

No curves.png for the runs made inside the suite: matplotlib takes about a second a figure, 40 s over the suite.
A run still asks for it (`figures_asked`); test_credit checks that, and draws the figure of a run for real."""

import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402

REAL_PLOT_CURVES = vineppo.plot_curves
figures_asked = []  # (run directories, path) of every plot_curves call


@pytest.fixture(autouse=True, scope="session")
def runs_draw_no_curves():
    def ask(run_dirs, path, labels=None):
        figures_asked.append((list(run_dirs), path))
        return path
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vineppo, "plot_curves", ask)
        yield


def seed_everything():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def seeded_file():  # before the file's own fixtures (autouse ones come first in their scope)
    seed_everything()


@pytest.fixture(autouse=True)
def seeded_test():
    seed_everything()
