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


def _set_in(*keys_and_value):
    """Set c[k1][k2]...[kn] = value (value last)."""
    *keys, last, value = keys_and_value
    def edit(c):
        for key in keys:
            c = c[key]
        c[last] = value
    return edit


def _pop(*keys):
    """Delete c[k1][k2]...[kn]."""
    *keys, last = keys
    def edit(c):
        for key in keys:
            c = c[key]
        del c[last]
    return edit


def _two_ranks(rank_rng):
    def edit(c):
        c["world_size"] = 2
        if rank_rng is not None:
            c["rank_rng"] = rank_rng(c)
    return edit


def _drop_pass_at_1(c):
    for record in c["history"]:
        record.pop("eval/pass@1", None)


def _nan_weight(c):
    name = next(n for n in c["policy"] if "layers" in n)  # not the embedding, which the LM head may share
    c["policy"][name] = torch.full_like(c["policy"][name], float("nan"))


# Each reaches the resume's first write in today's code if not refused (--iterations 2: one more iteration runs).
@pytest.mark.parametrize("edit, expected", [
    (_set("history", []), "'history' holds 0 records"),
    (_set("history", [1]), "'history' holds 1 records"),
    (_set_in("history", 1, 1), "history record 1 is not a dict"),
    (_set("iteration", 5), "'history' holds 2 records for iterations 0 to 5"),
    (_set("iteration", -1), "'history' holds 2 records for iterations 0 to -1"),
    (_drop_pass_at_1, "history record 0 lacks 'eval/pass@1'"),
    (_set_in("history", 1, "losses/kl", torch.tensor(0.5)), "history record 1 is not a dict of numbers"),
    (_set_in("history", 1, "note", "text"), "history record 1 is not a dict of numbers"),
    (_set_in("history", 1, "iteration", 7), "with 'iteration': 1"),
    (_set_in("history", 1, "time/elapsed_s", float("nan")), "history record 1 has a non-finite"),
    (_set_in("schedulers", 0, "last_epoch", "x"), "schedulers[0]['last_epoch'] = 'x' is not an int"),
    (_set_in("schedulers", 0, "last_epoch", 1.5), "schedulers[0]['last_epoch'] = '1.5' is not an int"),
    (_set_in("schedulers", 1, "base_lrs", []), "schedulers[1]['base_lrs'] is not a list of 1"),
    (_set_in("schedulers", 0, "_last_lr", [torch.tensor(1.0)]), "schedulers[0]['_last_lr'][0]"),
    (_pop("schedulers", 0, "last_epoch"), "schedulers[0] lacks 'last_epoch'"),
    (_set_in("schedulers", 0, "_get_lr_called_within_step", "no"), "is not a flag"),
    (_set_in("optimizers", 0, "param_groups", 0, "lr", "fast"), "optimizers[0]['param_groups'][0]['lr'] = 'fast'"),
    (_set_in("optimizers", 0, "param_groups", 0, "eps", float("inf")), "['eps'] = 'inf' is not a finite number"),
    (_set_in("optimizers", 1, "param_groups", 0, "betas", 0.9), "['betas'] is not a list of 2"),
    (_pop("optimizers", 0, "param_groups", 0, "lr"), "optimizers[0]['param_groups'][0] lacks 'lr'"),
    (_set_in("optimizers", 0, "param_groups", 0, "params", 0, "zero"), "['params'][0] = 'zero' is not an int"),
    (_set_in("optimizers", 0, "state", "junk"), "optimizers[0]['state'] is not a dict"),
    (_set_in("optimizers", 0, "state", 0, "exp_avg", torch.zeros(3)), "optimizers[0]['state'][0] is not a dict of tensors"),
    (_set_in("optimizers", 1, "state", 0, "exp_avg_sq", 1.0), "optimizers[1]['state'][0] is not a dict of tensors"),
    (_set_in("optimizers", 0, "state", 10_000, {}), "optimizers[0]['state'][10000]"),
    (_two_ranks(None), "'rank_rng' does not hold one random state per rank"),
    (_two_ranks(lambda c: [c["rng"]]), "'rank_rng' does not hold one random state per rank"),
    (_set("world_size", 0), "'world_size' is 0"),
    (_nan_weight, "holds non-finite weights"),
], ids=["history empty", "history [1]", "a record not a dict", "iteration past the history", "iteration negative",
        "no pass@1 before RL", "a tensor in a record", "a string in a record", "a record of another iteration",
        "elapsed time nan", "scheduler last_epoch a string", "scheduler last_epoch a float", "scheduler base_lrs empty",
        "scheduler _last_lr a tensor", "scheduler without last_epoch", "scheduler flag a string", "lr a string",
        "eps infinite", "betas a number", "param group without lr", "param index a string", "optimizer state not a dict",
        "moment of another shape", "moment a float", "state of no parameter", "two ranks, no rank_rng",
        "two ranks, one rank_rng", "no processes", "nan weights"])
def test_a_checkpoint_with_values_a_resume_cannot_use_is_refused_before_anything_is_written(saved_run, tmp_path, edit,
                                                                                          expected):
    run_dir = _edit(saved_run, tmp_path, edit)
    message = resume_refused(run_dir, "--iterations", "2")  # every file of the run stays byte-identical
    assert expected in message and "checkpoint.pt" in message and "start a new run" in message


def test_a_two_rank_checkpoint_without_every_ranks_random_state_is_not_one_of_vineppos(saved_run):
    checkpoint = torch.load(saved_run / "checkpoint.pt", weights_only=True)
    states = [checkpoint["rng"], checkpoint["rng"]]
    assert vineppo.checkpoint_problems({**checkpoint, "world_size": 2, "rank_rng": states}) == []
    for rank_rng in ([], states[:1], states * 2, [states[0], {"python": states[0]["python"]}]):
        assert vineppo.checkpoint_problems({**checkpoint, "world_size": 2, "rank_rng": rank_rng}) == [
            "'rank_rng' does not hold one random state per rank"]
    del checkpoint["rng"]["torch"]
    assert vineppo.checkpoint_problems(checkpoint) == ["'rng' lacks the python or torch random state"]


def test_resuming_with_fewer_iterations_than_the_checkpoint_is_refused(saved_run, tmp_path):
    run_dir = _edit(saved_run, tmp_path, lambda c: None)
    message = resume_refused(run_dir, "--iterations", "0")
    assert "saved after iteration 1" in message and "--iterations 1 or more" in message


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
