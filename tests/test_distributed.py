"""torchrun data parallel (gloo on CPU, 2 processes): one update on 2 ranks, each with part of a fixed batch,
gives the same gradients as one process with the whole batch; and the script itself under torchrun logs,
checkpoints, stops on Ctrl-C and resumes exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN  # noqa: E402

# A worker for one rank (or the single process when WORLD_SIZE is 1): a tiny policy and critic, a fixed batch of 6
# responses of different lengths with hand-set advantages, returns and old log-probs; one minibatch of all rows.
# Rank 0 holds rows 0-1 (short responses), rank 1 rows 2-5 (long ones), so the halves hold different token counts.
WORKER = textwrap.dedent('''
    import os, sys, torch
    sys.path.insert(0, sys.argv[1])
    import vineppo
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    tok = vineppo.build_tiny_tokenizer()
    policy = vineppo.build_tiny_model(tok, seed=0)
    critic = vineppo.ValueNetwork.from_policy(policy)
    g = torch.Generator().manual_seed(1)
    prompts = [[5 + i, 6, 7] for i in range(6)]
    responses = [[8 + (j % 20) for j in range(n)] for n in (2, 3, 7, 9, 6, 8)]
    batch = vineppo.collate(prompts, responses, tok.pad_token_id)
    mask = batch["response_mask"]
    advantages = torch.randn(mask.shape, generator=g) * 2 + 0.7
    returns = torch.rand(mask.shape, generator=g)
    with torch.no_grad():
        logp = vineppo.response_logprobs(policy, batch, 0.6)
    fixed = {"logp_old": logp + 0.05 * torch.randn(mask.shape, generator=g),
             "logp_ref": logp + 0.3 * torch.randn(mask.shape, generator=g),
             "values_old": torch.rand(mask.shape, generator=g)}
    rank = int(os.environ.get("RANK", 0))
    rows = [0, 1, 2, 3, 4, 5] if world == 1 else [[0, 1], [2, 3, 4, 5]][rank]
    if os.environ.get("SPLIT") == "all on rank 1":  # rank 0 holds rows but none of them is in this minibatch
        rows = [[0, 1], [0, 1, 2, 3, 4, 5]][rank]
    minibatch = torch.arange(0 if os.environ.get("SPLIT") == "all on rank 1" and rank == 0 else len(rows))
    width = max(len(responses[r]) for r in rows)
    local = vineppo.collate([prompts[r] for r in rows], [responses[r] for r in rows], tok.pad_token_id)
    pick = lambda t: t[rows][:, -width:] * local["response_mask"]
    args = vineppo.Args(temperature=0.6, micro_batch_size=2, kl_coef=0.5, clip_range=0.2, value_clip_range=0.2)
    sums = vineppo.minibatch_backward(policy, critic, local, {k: pick(v) for k, v in fixed.items()}, pick(advantages),
                                      pick(returns), minibatch, args, torch.device("cpu"))
    sums = vineppo.global_sums(sums)
    vineppo.sum_gradients([policy, critic])
    if rank == 0:
        grads = {"policy." + n: p.grad for n, p in policy.named_parameters()}
        grads.update({"critic." + n: p.grad for n, p in critic.named_parameters()})
        torch.save({"grads": grads, "sums": dict(sums)}, sys.argv[2])
    if world > 1:  # leave together: a rank that exits while gloo still talks to it can abort (SIGABRT) at exit
        dist.barrier()
        dist.destroy_process_group()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path: Path, world: int, vineppo_dir: Path = ROOT, split: str = "halves") -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"grads_{world}.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SPLIT": split}
    procs = [subprocess.Popen([sys.executable, str(script), str(vineppo_dir), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    return torch.load(out, weights_only=True)


def max_relative_difference(a: dict, b: dict) -> float:
    largest = max(t.abs().max().item() for t in a.values())
    return max((a[k] - b[k]).abs().max().item() for k in a) / largest


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """One process with the whole minibatch (there every all-reduce is the identity)."""
    return run_worker(tmp_path_factory.mktemp("whole"), 1)


@pytest.mark.parametrize("split", ["halves", "all on rank 1"])
def test_two_ranks_give_the_gradients_of_one_process_on_the_whole_minibatch(tmp_path, whole, split):
    """Rows 0-1 on rank 0 and 2-5 on rank 1 (different token counts), or a minibatch with no row of rank 0."""
    split = run_worker(tmp_path, 2, split=split)
    assert set(whole["grads"]) == set(split["grads"])
    assert all(g.abs().max() > 0 for k, g in whole["grads"].items() if "embed" not in k)  # everything is trained
    for model in ("policy.", "critic."):
        part = lambda d: {k: v for k, v in d["grads"].items() if k.startswith(model)}  # noqa: E731
        assert max_relative_difference(part(whole), part(split)) <= 1e-6, model
    for key in ("tokens", "policy_loss", "kl", "value_loss", "ratio", "clipped", "approx_kl"):
        assert split["sums"][key] == pytest.approx(whole["sums"][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("planted", ["whitening per rank", "token count per rank"])
def test_the_equivalence_test_sees_statistics_left_per_rank(tmp_path, planted, whole):
    """The same comparison with one statistic left per rank must fail: a copy of vineppo.py with the bug."""
    source = (ROOT / "vineppo.py").read_text()
    old, new = {"whitening per rank": ("mean = global_sum((values * mask).sum()) / n",
                                       "n = mask.sum()\n    mean = (values * mask).sum() / n"),
                "token count per rank": ("n_tokens, n_responses = global_sum(sums[\"tokens\"]),",
                                         "n_tokens, n_responses = sums[\"tokens\"],")}[planted]
    assert source.count(old) == 1
    (tmp_path / "vineppo.py").write_text(source.replace(old, new))
    split = run_worker(tmp_path, 2, tmp_path)
    policy = lambda d: {k: v for k, v in d["grads"].items() if k.startswith("policy.")}  # noqa: E731
    assert max_relative_difference(policy(whole), policy(split)) > 1e-3


TORCHRUN_RUN = TINY_RUN[:]
TORCHRUN_RUN[TORCHRUN_RUN.index("--iterations") + 1] = "4"
TORCHRUN_RUN += ["--critic", "value", "--critic-warmup", "1"]  # the critic too: its head starts alike on both ranks


def torchrun(*flags, cwd, **kwargs):
    """`torchrun --nproc-per-node 2 vineppo.py FLAGS` in its own process group (as a terminal would run it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), str(ROOT / "vineppo.py"), *flags]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def test_torchrun_logs_checkpoints_stops_on_ctrl_c_and_resumes_exactly(tmp_path):
    whole = torchrun(*TORCHRUN_RUN, "--output-dir", "whole", cwd=tmp_path)  # both runs at once: the test waits less
    split = torchrun(*TORCHRUN_RUN, "--output-dir", "split", "--save-every", "100", cwd=tmp_path)
    deadline = time.time() + 300
    while len(records(tmp_path / "split" / "metrics.jsonl")) < 2 and split.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(split.pid, signal.SIGINT)  # Ctrl-C in the terminal: torchrun and both ranks get it
    _, split_err = split.communicate(timeout=120)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    logged = records(tmp_path / "whole" / "metrics.jsonl")
    assert [r["iteration"] for r in logged] == [0, 1, 2, 3, 4]  # one line per iteration: rank 0 alone writes
    assert all("balance/busiest_rank_tokens" in r for r in logged[1:])
    assert out.count("pass@1 before RL") == 2 and out.count("iter   1 |") == 1  # one print, the final line too
    assert (tmp_path / "whole" / "final").is_dir() and not list((tmp_path / "whole").glob("*.tmp"))

    # torchrun itself prints its SignalException; neither rank may print a traceback of its own
    assert split.returncode != 0 and 'vineppo.py", line' not in split_err, split_err
    assert split_err.count("continue with: torchrun --nproc-per-node 2 vineppo.py --output-dir split --resume") == 1, split_err
    checkpoint = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    stopped_at = checkpoint["iteration"]
    assert 1 <= stopped_at < 4 and checkpoint["world_size"] == 2 and len(checkpoint["rank_rng"]) == 2
    assert [r["iteration"] for r in records(tmp_path / "split" / "metrics.jsonl")] == list(range(stopped_at + 1))

    with pytest.raises(SystemExit, match=r"saved by 2 process\(es\), this run has 1"):  # one process, no torchrun
        vineppo.main(["--output-dir", str(tmp_path / "split"), "--resume"])

    again = torchrun("--output-dir", "split", "--resume", cwd=tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert records(tmp_path / "split" / "metrics.jsonl") == logged  # as if it had never stopped
