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
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN  # noqa: E402

def one_update(vineppo, rank: int, world: int, split: str) -> dict:
    """One update of a tiny policy and critic on this rank's rows of a fixed batch of 6 responses of different
    lengths, with hand-set advantages, returns and old log-probs, in one minibatch of all rows: the gradients
    (summed over the ranks) and the loss sums. Split "halves": rank 0 holds rows 0-1 (short responses), rank 1
    rows 2-5 (long ones), so the halves hold different token counts; "all on rank 1": rank 0 holds rows but
    none of them is in the minibatch. One process (world 1) holds every row."""
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
    rows = [0, 1, 2, 3, 4, 5] if world == 1 else [[0, 1], [2, 3, 4, 5]][rank]
    if split == "all on rank 1":
        rows = [[0, 1], [0, 1, 2, 3, 4, 5]][rank]
    minibatch = torch.arange(0 if split == "all on rank 1" and rank == 0 else len(rows))
    width = max(len(responses[r]) for r in rows)
    local = vineppo.collate([prompts[r] for r in rows], [responses[r] for r in rows], tok.pad_token_id)
    pick = lambda t: t[rows][:, -width:] * local["response_mask"]  # noqa: E731
    args = vineppo.Args(temperature=0.6, micro_batch_size=2, kl_coef=0.5, clip_range=0.2, value_clip_range=0.2)
    sums = vineppo.minibatch_backward(policy, critic, local, {k: pick(v) for k, v in fixed.items()}, pick(advantages),
                                      pick(returns), minibatch, args, torch.device("cpu"))
    sums = vineppo.global_sums(sums)
    vineppo.sum_gradients([policy, critic])
    grads = {"policy." + n: p.grad for n, p in policy.named_parameters()}
    grads.update({"critic." + n: p.grad for n, p in critic.named_parameters()})
    return {"grads": grads, "sums": dict(sums)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(source: str, tmp_path: Path, world: int, *argv) -> list[tuple[int, str]]:
    """Run the worker `source` as `world` gloo ranks (as torchrun would start them); (exit code, stderr) per rank."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, argv)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = [proc.communicate(timeout=240)[1] for proc in procs]
    return [(proc.returncode, err) for proc, err in zip(procs, errors)]


def max_relative_difference(a: dict, b: dict) -> float:
    largest = max(t.abs().max().item() for t in a.values())
    return max((a[k] - b[k]).abs().max().item() for k in a) / largest


PLANTED = {  # a statistic left per rank: what the equivalence test must catch (vineppo.py's line -> the bug)
    "whitening per rank": ("mean = global_sum((values * mask).sum()) / n",
                           "n = mask.sum()\n    mean = (values * mask).sum() / n"),
    "token count per rank": ("n_tokens, n_responses = global_sum(sums[\"tokens\"]),",
                             "n_tokens, n_responses = sums[\"tokens\"],"),
}


@pytest.fixture(scope="module")
def whole():
    """One process with the whole minibatch (there every all-reduce is the identity): this one."""
    return one_update(vineppo, 0, 1, "halves")


@pytest.fixture(scope="module")
def split(launched):
    """Case -> what 2 ranks found: the two splits, and the halves with each planted bug (in the file's one launch)."""
    assert all(code == 0 for code, _ in launched["ends"]), launched["ends"]
    return launched["updates"]


@pytest.mark.parametrize("case", ["halves", "all on rank 1"])
def test_two_ranks_give_the_gradients_of_one_process_on_the_whole_minibatch(whole, split, case):
    """Rows 0-1 on rank 0 and 2-5 on rank 1 (different token counts), or a minibatch with no row of rank 0."""
    split = split[case]
    assert set(whole["grads"]) == set(split["grads"])
    assert all(g.abs().max() > 0 for k, g in whole["grads"].items() if "embed" not in k)  # everything is trained
    for model in ("policy.", "critic."):
        part = lambda d: {k: v for k, v in d["grads"].items() if k.startswith(model)}  # noqa: E731
        assert max_relative_difference(part(whole), part(split)) <= 1e-6, model
    for key in ("tokens", "policy_loss", "kl", "value_loss", "ratio", "clipped", "approx_kl"):
        assert split["sums"][key] == pytest.approx(whole["sums"][key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("planted", PLANTED)
def test_the_equivalence_test_sees_statistics_left_per_rank(whole, split, planted):
    """The same comparison with one statistic left per rank must fail: a copy of vineppo.py with the bug."""
    policy = lambda d: {k: v for k, v in d["grads"].items() if k.startswith("policy.")}  # noqa: E731
    assert max_relative_difference(policy(whole), policy(split[planted])) > 1e-3


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
    assert split_err.count("SIGINT: finishing this iteration") == 1, split_err  # both ranks got it: rank 0 says it
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


# Each rank's part of a run under torchrun, on 2 gloo ranks: the random streams, the shuffled minibatches,
# the re-shard of the Monte Carlo rollouts and the MC credit, and the phases where a rank can have nothing to
# do (a minibatch, an SFT batch or an evaluation shard without a row of its own); then `one_update`'s cases. Rank 0
# writes what every rank found after each part, so a part that fails leaves the earlier ones readable.
RANKS_RUN = ["--critic", "grpo", "--sft-epochs", "0", "--prompts-per-iteration", "3", "--samples-per-prompt", "1",
             "--minibatch-size", "1", "--micro-batch-size", "1", "--epochs", "1", "--train-problems", "12",
             "--test-problems", "1", "--eval-samples", "1", "--max-new-tokens", "16", "--iterations", "1",
             "--critic-warmup", "1", "--dist-timeout", "60"]
WORKER = textwrap.dedent('''
    import dataclasses, importlib.util, json, os, sys, torch
    sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
    import vineppo
    import torch.distributed as dist
    from test_distributed import RANKS_RUN, hand_made_episodes, one_update, stand_in_mc_rollout

    out, rank = sys.argv[2], int(os.environ["RANK"])
    found = {}
    def save():
        gathered = vineppo.every_rank([found])
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    checksum = lambda model: sum(p.double().sum().item() for p in model.parameters())

    args = vineppo.parse_args(RANKS_RUN + ["--output-dir", os.path.join(os.path.dirname(out), "run")])
    run = vineppo.start_run(args)  # its evaluation: 1 test problem for 2 ranks
    found["pass@1"] = run.history[0]["eval/pass@1"]
    found["stream"] = torch.rand(4).tolist()  # this rank's random stream as RL starts
    save()

    torch.manual_seed(7 + 100 * rank)  # a generator of its own on each rank; 3 rows on rank 0, 4 on rank 1
    offset, n_rows = [(0, 3), (3, 4)][rank]
    found["minibatches"] = [(rows + offset).tolist() for rows in vineppo.shuffled_minibatches(n_rows, 3)]
    found["rollouts"] = vineppo.rank_shard_rollouts(lambda prefixes: [[p, rank] for p in prefixes])(list(range(7)))
    vineppo.mc_rollout = stand_in_mc_rollout
    episodes = vineppo.rank_share(hand_made_episodes(run.tokenizer, run.train))
    batch = vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes],
                            run.tokenizer.pad_token_id)
    advantages, _, _ = vineppo.assign_credit(episodes, batch, {}, None, run.tokenizer, run.train,
                                             dataclasses.replace(args, critic="mc", mc_rollouts=3))
    found["credit"] = [[e.step_values, e.token_advantages, advantages[i][batch["response_mask"][i] > 0].tolist()]
                       for i, e in enumerate(episodes)]
    save()

    torch.manual_seed(0)  # the same critic on both ranks, as start_run builds it
    run.value_model = vineppo.ValueNetwork.from_policy(run.policy).eval()
    start = checksum(run.value_model)
    vineppo.warm_up_critic(run, dataclasses.replace(args, critic="value"))  # 3 minibatches of 1 response
    found["critic"] = [start, checksum(run.value_model)]
    save()

    start = checksum(run.policy)  # SFT batches of 1 sequence for 2 ranks
    vineppo.supervised_finetune(run.policy, run.tokenizer, run.train[:3],
                                dataclasses.replace(args, sft_epochs=1, sft_batch_size=1), run.device)
    found["policy"] = [start, checksum(run.policy)]
    save()

    updates = {}  # `one_update` for each case: a split and a copy of vineppo.py (the repository's or a planted bug's)
    for case, (vineppo_dir, split) in json.loads(sys.argv[3]).items():
        path = os.path.join(vineppo_dir, "vineppo.py")
        spec = importlib.util.spec_from_file_location(f"vineppo_{len(updates)}", path)
        sys.modules[spec.name] = copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
        updates[case] = one_update(copy, rank, 2, split)
    if rank == 0:
        torch.save(updates, sys.argv[4])
    dist.barrier()  # leave together: a rank that exits while gloo still talks to it can abort (SIGABRT) at exit
    dist.destroy_process_group()
''')


def state_reward(state: tuple) -> float:
    """A stand-in for a rollout's reward that depends on the state alone: the MC values then do not depend on
    which rank rolls out what, only on every state getting its own rewards back."""
    return (7 * sum(state) + len(state)) % 5 / 4


def stand_in_mc_rollout(model, tokenizer, origin, args, counts=None, desc=""):
    return lambda states: [state_reward(state) for state in states]


def hand_made_episodes(tokenizer, problems: list[dict]) -> list:
    """Two responses to each of 3 problems: the tutor's solution, and the same without its last two lines."""
    texts = [(i, text) for i in range(3) for text in (problems[i]["solution"],
                                                       "\n".join(problems[i]["solution"].split("\n")[:-2]))]
    return [vineppo.episode_from_text(tokenizer, problems[i], text, task="arith", index=i) for i, text in texts]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The file's one launch of 2 gloo ranks (the imports take most of a launch's time): what each rank found (a
    list: rank 0, rank 1), their exit codes and stderr, and the updates of `one_update`'s cases."""
    tmp_path = tmp_path_factory.mktemp("ranks")
    cases = {"halves": (str(ROOT), "halves"), "all on rank 1": (str(ROOT), "all on rank 1")}
    source = (ROOT / "vineppo.py").read_text()
    for i, (planted, (old, new)) in enumerate(PLANTED.items()):
        assert source.count(old) == 1
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "vineppo.py").write_text(source.replace(old, new))
        cases[planted] = (str(tmp_path / str(i)), "halves")
    ends = launch(WORKER, tmp_path, 2, ROOT, tmp_path / "found.json", json.dumps(cases), tmp_path / "updates.pt")
    found = json.loads((tmp_path / "found.json").read_text()) if (tmp_path / "found.json").exists() else [{}, {}]
    updates = torch.load(tmp_path / "updates.pt", weights_only=True) if (tmp_path / "updates.pt").exists() else {}
    return {"found": found, "ends": ends, "updates": updates}


@pytest.fixture(scope="module")
def ranks(launched):
    """What each of 2 ranks found (a list: rank 0, rank 1), and the ranks' exit codes and stderr."""
    return launched["found"], launched["ends"]


def test_every_rank_draws_its_own_random_stream(ranks):
    """Each rank samples its own responses: the ranks' streams differ as RL starts (the models are the same)."""
    (rank0, rank1), _ = ranks
    assert len(rank0["stream"]) == len(rank1["stream"]) == 4
    assert rank0["stream"] != rank1["stream"]


def test_every_rank_takes_its_rows_of_rank_0s_permutation(ranks):
    """shuffled_minibatches: the minibatches of 2 ranks are those of rank 0's permutation of the global batch,
    whatever each rank's own generator would draw."""
    (rank0, rank1), _ = ranks
    torch.manual_seed(7)  # rank 0's generator in the worker
    expected = torch.randperm(7).split(3)
    assert len(rank0["minibatches"]) == len(rank1["minibatches"]) == len(expected)
    for mine, theirs, rows in zip(rank0["minibatches"], rank1["minibatches"], expected):
        assert all(r < 3 for r in mine) and all(r >= 3 for r in theirs)  # each rank keeps its own rows
        assert sorted(mine + theirs) == sorted(rows.tolist())


def test_the_monte_carlo_rollouts_come_back_to_their_own_states(ranks):
    """rank_shard_rollouts: every prefix gets its own rollout's result back, in order, and both ranks roll out."""
    (rank0, rank1), _ = ranks
    assert rank0["rollouts"] == rank1["rollouts"]
    assert [p for p, _ in rank0["rollouts"]] == list(range(7))
    assert sorted(Counter(r for _, r in rank0["rollouts"]).values()) == [3, 4]  # even shares


def test_two_ranks_give_one_process_mc_values_and_advantages(ranks, monkeypatch):
    """VinePPO's credit under torchrun: the same responses, 3 on each of 2 ranks, get the step values and the
    advantages that one process gives them all (the rollouts are a stand-in that depends on the state only)."""
    (rank0, rank1), _ = ranks
    monkeypatch.setattr(vineppo, "mc_rollout", stand_in_mc_rollout)
    args = vineppo.parse_args(RANKS_RUN + ["--critic", "mc", "--mc-rollouts", "3"])
    tokenizer, (train, _, _) = vineppo.build_tiny_tokenizer(), vineppo.load_task(args)
    episodes = hand_made_episodes(tokenizer, train)
    batch = vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes],
                            tokenizer.pad_token_id)
    advantages, _, _ = vineppo.assign_credit(episodes, batch, {}, None, tokenizer, train, args)
    whole = [[e.step_values, e.token_advantages, advantages[i][batch["response_mask"][i] > 0].tolist()]
             for i, e in enumerate(episodes)]
    assert len({v for e in episodes for v in e.step_values}) > 2  # the states' values differ
    split = [None] * len(whole)
    split[0::2], split[1::2] = rank0["credit"], rank1["credit"]  # rank_share: rank 0 holds 0, 2, 4
    assert split == whole


def test_a_rank_without_rows_in_a_warm_up_minibatch_adds_zeros(ranks):
    """The critic warm-up on 3 responses in minibatches of 1: each rank meets minibatches without a row of its
    own; it adds zeros, and both ranks end with the same trained critic."""
    (rank0, rank1), ends = ranks
    assert "critic" in rank0, ends
    assert rank0["critic"] == rank1["critic"] and rank0["critic"][0] != rank0["critic"][1]


def test_a_rank_without_rows_in_an_sft_batch_or_an_evaluation_shard_adds_zeros(ranks):
    """SFT batches of 1 sequence and 1 test problem for 2 ranks: the rank without one takes part with zeros."""
    (rank0, rank1), ends = ranks
    assert "policy" in rank0, ends
    assert rank0["policy"] == rank1["policy"] and rank0["policy"][0] != rank0["policy"][1]
    assert rank0["pass@1"] == rank1["pass@1"]
    assert all(code == 0 for code, _ in ends), ends


def test_fewer_prompts_than_ranks_is_refused_with_one_line(monkeypatch):
    """A rank without a problem of its own has no responses to train on: refused before anything starts."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as refused:
        vineppo.parse_args(RANKS_RUN + ["--prompts-per-iteration", "1"])
    message = str(refused.value.code)
    assert message.startswith("error: --prompts-per-iteration 1") and "2 ranks" in message and "\n" not in message
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert vineppo.parse_args(RANKS_RUN + ["--prompts-per-iteration", "1"]).prompts_per_iteration == 1


def test_the_random_states_are_this_ranks_gpu_only(monkeypatch):
    """A checkpoint holds the random state of this rank's GPU (torchrun set it as the current device), not of every
    visible GPU, and a resume sets that GPU's alone; an older checkpoint's list of every GPU's states still loads.
    (CUDA is faked: the test runs on any CPU.)"""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([1], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": touched.append(state.tolist()))
    for every_gpu in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, every_gpu, lambda *args: touched.append("every GPU"))
    states = vineppo.rng_states()
    vineppo.set_rng_states(states)
    older = [torch.tensor([5], dtype=torch.uint8), torch.tensor([6], dtype=torch.uint8)]  # GPU 0's and GPU 1's
    vineppo.set_rng_states({**states, "cuda": older})
    assert touched == [[1], [6]]  # this GPU's state, then GPU 1's of the older list
