"""A checkpoint is data, never code: `--resume` reads it with weights_only=True, and anything that is not what
vineppo.py writes ends the run with one line, a non-zero exit, and nothing written."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN  # noqa: E402


class RunsAShellCommand:
    """Unpickling this calls os.system: what a checkpoint shared by a stranger could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 1-iteration run with a critic (so every entry of a checkpoint is there)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    vineppo.main(TINY_RUN + ["--iterations", "1", "--critic", "value", "--output-dir", str(out)])
    return out


def snapshot(directory: Path) -> dict:
    """Every file under a directory with its bytes: 'nothing written' means this does not change."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def resume_refused(run_dir: Path, *flags) -> str:
    """Resume the run in-process: it must exit non-zero with one line and leave the directory as it was."""
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as refused:
        vineppo.main(["--output-dir", str(run_dir), "--resume", *flags])
    message = str(refused.value.code)
    assert refused.value.code not in (0, None) and message.startswith("error: ") and "\n" not in message
    assert snapshot(run_dir) == before, "a refused resume wrote into the run"
    return message


def test_a_checkpoint_that_carries_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    checkpoint = {"iteration": 1, "args": RunsAShellCommand(marker), "policy": {}}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    # the danger is real: a full unpickle runs the command
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "vineppo.py"), "--resume", str(tmp_path / "checkpoint.pt"),
                           "--output-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert not marker.exists(), "resuming ran the code inside the checkpoint"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read") and "checkpoint.pt" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_saved_checkpoint_is_plain_data(saved_run):
    checkpoint = torch.load(saved_run / "checkpoint.pt", weights_only=True)
    assert vineppo.checkpoint_problems(checkpoint) == []
    assert isinstance(checkpoint["sampler"], tuple) and isinstance(checkpoint["rng"]["python"], tuple)


def _edit(saved_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the saved run whose checkpoint was changed by edit(checkpoint) (which may return a new object)."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint = edit(checkpoint) or checkpoint
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    return run_dir


def _drop(key, within=None):
    def edit(c):
        del (c[within] if within else c)[key]
    return edit


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _set_arg(name, value):
    return lambda c: c["args"].__setitem__(name, value)


def _widen(key, name):
    return lambda c: c[key].__setitem__(name, torch.zeros(c[key][name].shape[0] + 1, *c[key][name].shape[1:]))


@pytest.mark.parametrize("edit, expected", [
    (lambda c: ["not", "a", "dict"], "holds a list"),
    (_drop("policy"), "no 'policy'"),
    (_drop("rng"), "no 'rng'"),
    (_set("args", ["lr", 1e-3]), "'args' is a list"),
    (_set("iteration", "1"), "'iteration' is a str"),
    (_set("history", {"iteration": 0}), "'history' is a dict"),
    (_set_arg("lr", "fast"), "setting 'lr'"),
    (_set_arg("no_such_setting", 1), "setting 'no_such_setting'"),
    (lambda c: c["policy"].__setitem__("extra", [1, 2]), "'policy' holds something other than tensors"),
    (_drop("torch", within="rng"), "'rng' lacks"),
], ids=["not a dict", "no policy", "no rng", "args not a mapping", "iteration a string", "history a dict",
        "a setting of the wrong type", "an unknown setting", "policy holds a list", "no torch random state"])
def test_a_malformed_checkpoint_is_refused_with_one_line(saved_run, tmp_path, edit, expected):
    run_dir = _edit(saved_run, tmp_path, edit)
    message = resume_refused(run_dir)
    assert expected in message and "checkpoint.pt" in message and "resume from another checkpoint" in message


@pytest.mark.parametrize("key", ["policy", "value"])
def test_tensors_of_the_wrong_shape_are_refused_with_one_line(saved_run, tmp_path, key):
    name = next(n for n, t in torch.load(saved_run / "checkpoint.pt", weights_only=True)[key].items() if t.dim() == 2)
    run_dir = _edit(saved_run, tmp_path, _widen(key, name))
    message = resume_refused(run_dir, "--iterations", "2")
    assert "does not fit this run" in message and "RuntimeError" in message


def test_optimizer_states_that_do_not_fit_are_refused_with_one_line(saved_run, tmp_path):
    run_dir = _edit(saved_run, tmp_path, lambda c: c.__setitem__("optimizers", c["optimizers"][:1]))
    assert "does not fit this run" in resume_refused(run_dir, "--iterations", "2")


def test_a_refused_resume_into_a_new_directory_creates_nothing(saved_run, tmp_path):
    run_dir = _edit(saved_run, tmp_path, _widen("policy", "model.embed_tokens.weight"))
    with pytest.raises(SystemExit, match="does not fit this run"):
        vineppo.main(["--resume", str(run_dir / "checkpoint.pt"), "--output-dir", str(tmp_path / "new"),
                      "--iterations", "2"])
    assert not (tmp_path / "new").exists()
