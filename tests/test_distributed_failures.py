"""Under torchrun (2 gloo ranks on a CPU): a stop that reaches one rank only still ends with the checkpoint and
the command that continues the run; a rank that is killed, or fails with an error, ends the other with one line
that says what happened, and the last checkpoint is intact and resumes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from test_distributed import ROOT, free_port, records

# vineppo.py under torchrun, with rank 1 doing what PLANT says in its update number N: "sigterm N" (a stop that
# reaches rank 1 alone), "kill N" (SIGKILL: gone without a word) or "fail N" (an error of its own).
WORKER = textwrap.dedent('''
    import atexit, os, signal, sys, time
    sys.path.insert(0, os.environ["VINEPPO_DIR"])
    import vineppo

    rank, (what, when) = int(os.environ["RANK"]), os.environ["PLANT"].split()
    ppo_update, write_atomically, updates = vineppo.ppo_update, vineppo.write_atomically, []

    def planted_update(*args, **kwargs):
        updates.append(1)
        if rank == 1 and len(updates) == int(when):
            if what == "fail":
                raise ValueError("a planted failure")
            os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "kill": signal.SIGKILL}[what])
        return ppo_update(*args, **kwargs)

    # A checkpoint that takes a while to write (a large model's): if rank 1 leaves meanwhile, torchrun stops rank 0
    # (SIGTERM, then SIGKILL 30 s later); here the write ends at once, as that SIGKILL would end it.
    left = os.path.join(os.environ["MARKERS"], "rank 1 left")
    def slow_write(path, write):
        if rank == 0 and what == "sigterm" and os.path.exists(path):  # the stop's checkpoint, not iteration 0's
            for _ in range(30):
                if os.path.exists(left):
                    os._exit(137)
                time.sleep(0.1)
        write_atomically(path, write)

    if rank == 1:
        atexit.register(lambda: open(left, "w").close())
    vineppo.ppo_update, vineppo.write_atomically = planted_update, slow_write
    vineppo.run_script()
''')
RUN = ["--critic", "grpo", "--sft-epochs", "0", "--prompts-per-iteration", "2", "--samples-per-prompt", "2",
       "--minibatch-size", "4", "--micro-batch-size", "4", "--epochs", "1", "--train-problems", "12",
       "--test-problems", "2", "--eval-samples", "1", "--max-new-tokens", "16", "--iterations", "4",
       "--eval-every", "100", "--dist-timeout", "60"]
CONTINUE = "continue with: torchrun --nproc-per-node 2 vineppo.py --output-dir out --resume"


def torchrun_worker(tmp_path: Path, plant: str, *flags) -> subprocess.CompletedProcess:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "VINEPPO_DIR": str(ROOT), "PLANT": plant, "MARKERS": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "worker.py", *flags]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def saved_iteration(tmp_path: Path) -> int:
    return torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["iteration"]


def test_a_stop_that_reaches_one_rank_ends_with_the_checkpoint_and_the_command_to_continue(tmp_path):
    """SIGTERM to rank 1 alone in iteration 1, and a slow checkpoint: no rank leaves before rank 0 has written it."""
    stopped = torchrun_worker(tmp_path, "sigterm 1", *RUN, "--output-dir", "out", "--save-every", "100")
    assert stopped.returncode != 0 and 'vineppo.py", line' not in stopped.stderr, stopped.stderr
    assert saved_iteration(tmp_path) == 1
    assert [r["iteration"] for r in records(tmp_path / "out" / "metrics.jsonl")] == [0, 1]
    assert stopped.stderr.count(f"stopped by SIGTERM after iteration 1: checkpoint saved to out/checkpoint.pt; "
                                f"{CONTINUE}\n") == 1, stopped.stderr
    assert "finishing this iteration" not in stopped.stderr  # rank 0 alone speaks, and the signal missed it


def test_a_lost_rank_ends_the_other_with_one_line_and_the_last_checkpoint_resumes(tmp_path):
    """Rank 1 killed in iteration 2: rank 0 ends with one line, the checkpoint of iteration 1 is intact. It resumes,
    and rank 1 then fails with an error of its own in iteration 3: rank 0's line names rank 1 and its error."""
    killed = torchrun_worker(tmp_path, "kill 2", *RUN, "--output-dir", "out", "--save-every", "1")
    errors = [line for line in killed.stderr.splitlines() if line.startswith("error:")]
    assert killed.returncode != 0 and len(errors) == 1 and "[rank0]" not in killed.stderr, killed.stderr
    assert errors[0].startswith("error: rank 0 lost contact with the other ranks (")
    assert errors[0].endswith(f"the last checkpoint, out/checkpoint.pt, is intact: {CONTINUE} once every rank can run")
    assert saved_iteration(tmp_path) == 1
    assert [r["iteration"] for r in records(tmp_path / "out" / "metrics.jsonl")] == [0, 1]

    failed = torchrun_worker(tmp_path, "fail 2", "--output-dir", "out", "--resume")
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode != 0 and len(errors) == 1 and "[rank0]" not in failed.stderr, failed.stderr
    assert errors[0] == ("error: rank 1 failed (ValueError: a planted failure; its traceback is above, lines marked "
                         f"[rank1]), so rank 0 stopped too; the last checkpoint, out/checkpoint.pt, is intact: "
                         f"{CONTINUE} once every rank can run")
    assert "[rank1]: ValueError: a planted failure" in failed.stderr
    assert saved_iteration(tmp_path) == 2  # iteration 2 resumed from the checkpoint of iteration 1, and was saved
    assert [r["iteration"] for r in records(tmp_path / "out" / "metrics.jsonl")] == [0, 1, 2]
