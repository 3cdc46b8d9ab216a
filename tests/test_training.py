"""The training loop wired end to end on a tiny model, and the command line as a user runs it."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402

# A random tiny model never writes a right answer, so every advantage would be 0 and nothing would train.
# To test the WIRING, grade ended responses by a fixed function of their text instead: rewards then vary
# across responses and states, and a broken link anywhere (no gradient, wrong mask) shows up.
TINY_RUN = ["--iterations", "2", "--prompts-per-iteration", "4", "--samples-per-prompt", "4",
            "--minibatch-size", "8", "--micro-batch-size", "4", "--sft-epochs", "0", "--train-problems", "40",
            "--test-problems", "8", "--eval-samples", "1", "--mc-rollouts", "2", "--max-new-tokens", "24",
            "--eval-every", "1", "--lr", "1e-3",
            "--critic-warmup", "1"]  # the demo's 8 critic-only iterations cost seconds in every --critic value test


def parity_grader(text: str, gold: str) -> float:
    return float(sum(map(ord, text)) % 2)


@pytest.fixture(scope="module", params=["mc", "value"])
def tiny_run(request, tmp_path_factory):
    """Two iterations of one critic on a random tiny model, graded by `parity_grader`."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    patch = pytest.MonkeyPatch()
    patch.setattr(vineppo, "grade_gsm8k", parity_grader)
    try:
        result = vineppo.main(TINY_RUN + ["--critic", request.param, "--output-dir", str(out)])
    finally:
        patch.undo()
    return request.param, out, result


def test_every_trainable_parameter_changed(tiny_run):
    critic, _, result = tiny_run
    start = dict(result["reference"].named_parameters())  # the frozen reference IS the starting policy
    unchanged = [name for name, p in result["policy"].named_parameters() if torch.equal(p, start[name])]
    assert not unchanged, f"{critic}: parameters never updated: {unchanged}"
    if critic == "value":
        head = result["value_model"].head
        assert head.weight.abs().sum() > 0, "the value head never left its zero init"


def test_metrics_are_logged_and_finite(tiny_run):
    critic, out, _ = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    required = ["train/reward_mean", "eval/pass@1", "time/rollout_s", "time/credit_s", "time/update_s",
                "tokens/rollout", "tokens/mc", "losses/policy_loss", "losses/kl", "losses/clipfrac"]
    required += ["mc/value_std", "mc/truncated_frac"] if critic == "mc" else ["losses/value_loss",
                                                                              "value/explained_variance"]
    for record in records[1:]:
        for key in required:
            assert key in record, key
            assert math.isfinite(record[key]), (key, record[key])
    if critic == "mc":
        assert records[1]["tokens/mc"] > 0
    else:
        assert records[1]["tokens/mc"] == 0


def test_checkpoint_reloads(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    critic, out, result = tiny_run
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    text = vineppo.make_prompt("Start at 3: +4, *2.") + "\n3+4=7\n7*2=14\n#### 14\n"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == vineppo.build_tiny_tokenizer()(text)["input_ids"], "reloaded tokenizer differs"
    assert tokenizer.decode(ids[0]) == text and tokenizer.padding_side == "left"
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, result["policy"](ids).logits, atol=1e-5)
    assert not (out / "final.tmp").exists()
    if critic == "value":
        value_model = vineppo.ValueNetwork.load(str(out / "final" / "value")).eval()
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = result["value_model"](ids, mask, mask.cumsum(-1) - 1)
            assert torch.allclose(value_model(ids, mask, mask.cumsum(-1) - 1), expected, atol=1e-5)


def run_cli(*flags, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "vineppo.py"), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line_smoke(tmp_path):
    """The script as a user runs it: a tiny real run (with a little SFT) prints pass@1 before and after."""
    flags = TINY_RUN[:]
    flags[flags.index("--sft-epochs") + 1] = "0.5"
    proc = run_cli(*flags, "--iterations", "1", "--output-dir", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pass@1 before RL" in proc.stdout and "after RL" in proc.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    # a second run into the same directory is refused (the same SystemExit, in this process), the first run's files stay
    before = (tmp_path / "out" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        vineppo.main(flags + ["--iterations", "1", "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "final" / "model.safetensors").read_bytes() == before


def test_a_saved_model_loads_in_fp32(tmp_path):
    """`vineppo.py --model DIR` on a model saved in bf16: it loads through `from_pretrained` under this
    transformers version's name for the dtype keyword (`dtype=` is a TypeError on 4.51; none loads bf16 on 5.x),
    runs, and keeps fp32 master weights: the final checkpoint is the saved weights, upcast exactly."""
    from safetensors.torch import load_file
    tokenizer = vineppo.build_tiny_tokenizer()
    vineppo.build_tiny_model(tokenizer, seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    vineppo.main(["--model", str(tmp_path / "bf16"), "--task", "arith", *TINY_RUN, "--iterations", "0",
                  "--output-dir", str(tmp_path / "out")])
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    final = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert saved.keys() == final.keys() and all(t.dtype == torch.float32 for t in final.values())
    assert all(torch.equal(final[name], saved[name].float()) for name in saved)


def test_a_bad_argument_on_the_command_line_exits_non_zero_with_one_line(tmp_path):
    """The script as a user runs it (the other refusals are tested in this process: the same SystemExit)."""
    proc = run_cli("--mc-rollouts", "0", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --mc-rollouts must be at least 1, got 0"
    assert not (tmp_path / "runs").exists()


def test_help_lists_the_contract_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        vineppo.parse_args(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for flag in ["--model", "--task", "--critic", "--mc-rollouts", "--iterations", "--seed", "--output-dir", "--device"]:
        assert flag in out
    assert "paper: 9" in out  # field docstrings become the help text


def test_demo_overrides_apply_only_to_the_tiny_model():
    assert vineppo.parse_args([]).lr == vineppo.TINY_DEMO_OVERRIDES["lr"]
    assert vineppo.parse_args(["--lr", "3e-5"]).lr == 3e-5
    assert vineppo.parse_args(["--model", "some/hub-model"]).lr == vineppo.Args.lr == 1e-6


def test_critic_warmup_fits_the_returns_and_leaves_the_policy_alone(monkeypatch):
    """Hand-made rollouts: every response to problem 0 earns 1, every response to problem 1 earns 0. The
    warm-up trains the critic alone on them: it learns which problem is worth more (each value of problem 0
    at least 0.5 above each of problem 1, which the start is not), its squared error to the returns falls below
    a quarter of the start's, and the explained variance of the last batch, measured BEFORE training on it, is
    high; the policy does not move. The margins hold on any CPU: after training, other kernels move these
    values by up to 0.3, as another seed of the critic's head does."""
    tok = vineppo.build_tiny_tokenizer()
    policy = vineppo.build_tiny_model(tok, seed=0).eval()
    start = {name: p.clone() for name, p in policy.named_parameters()}
    problems = [{"problem": "Start at 1: +1.", "answer": "2"}, {"problem": "Start at 9: *5.", "answer": "45"}]
    prompts = [vineppo.encode_prompt(tok, p["problem"]) for p in problems]
    response = tok("\n7*2=9\n#### 9", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def fake_sample(model, tokenizer, train, indices, args):
        return [vineppo.Episode(i, prompts[i], response, "", float(i == 0), False) for i in indices for _ in range(4)]
    monkeypatch.setattr(vineppo, "sample_episodes", fake_sample)
    args = vineppo.Args(critic="value", critic_warmup=12, value_lr=1e-3, lr=1e-9, prompts_per_iteration=2,
                        minibatch_size=4, micro_batch_size=4, iterations=1)
    batch = vineppo.collate([prompts[0], prompts[1]], [response, response], tok.pad_token_id)
    returns = torch.tensor([[1.0], [0.0]])  # [2, 1]: problem 0's states are worth 1, problem 1's 0
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the critic's head and the warm-up's minibatch shuffles, whatever ran before
        value_model = vineppo.ValueNetwork.from_policy(policy).eval()
        run = vineppo.Run(tok, policy, policy, value_model, *vineppo.make_optimizers(policy, value_model, args),
                          problems, [], [], torch.device("cpu"))
        assert [o.param_groups[0]["initial_lr"] for o in run.optimizers] == [1e-9, 1e-3]  # --value-lr for the critic
        with torch.no_grad():
            values_before = vineppo.response_values(value_model, batch)  # [2, len(response)]
        began = time.time()
        record = vineppo.warm_up_critic(run, args)
        took = time.time() - began
    assert 0 <= record["time/critic_warmup_s"] <= took  # its duration (a loop variable once made it a clock reading)
    assert all(torch.equal(p, start[name]) for name, p in policy.named_parameters())
    assert record["tokens/critic_warmup"] == 12 * 8 * len(response)
    with torch.no_grad():
        values = vineppo.response_values(value_model, batch)  # [2, len(response)]
    assert (values_before[0] - values_before[1]).min() < 0.5  # the head's start does not tell the problems apart
    assert (values[0] - values[1]).min() > 0.5
    assert ((values - returns) ** 2).mean() < ((values_before - returns) ** 2).mean() / 4
    assert record["critic_warmup/explained_variance"] > 0.75
    args.value_lr = -1  # the default: the policy's lr, as in the paper
    assert vineppo.make_optimizers(policy, value_model, args)[0][1].param_groups[0]["initial_lr"] == 1e-9


@pytest.mark.parametrize("flags, message", [
    (["--mc-rollouts", "0"], "--mc-rollouts must be at least 1"),
    (["--critic", "critic"], "--critic must be one of mc, value, grpo, rloo"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--minibatch-size", "1000"], "larger than the batch"),
    (["--task", "chess"], "--task must be one of arith"),
    (["--chain-length", "6-4"], "--chain-length must be N or MIN-MAX"),
    (["--chain-length", "four"], "--chain-length must be N or MIN-MAX"),
    (["--slip-kinds", "mul,typo"], "--slip-kinds takes a comma-separated subset of mul,carry,borrow"),
    (["--slip-rate", "1.5"], "--slip-rate must be in [0, 1]"),
    (["--step-forms", "5"], "--step-forms must be 1 to 4"),
    (["--value-lr", "0"], "--value-lr must be positive or -1"),
    (["--critic-warmup", "-2"], "--critic-warmup"),
])
def test_bad_arguments_get_one_line_errors_and_leave_nothing(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        vineppo.main(flags)
    assert message in str(stop.value) and "\n" not in str(stop.value)
    assert not list(tmp_path.iterdir()), "a refused run must leave nothing behind"


def test_summarize_run_on_hand_made_metrics(tmp_path, capsys):
    """Credit quality is the mean explained variance over RL iterations (iteration 0 left out); seconds add
    the critic's warm-up to RL; tokens add responses, MC rollouts and warm-up rollouts."""
    records = [{"iteration": 0, "eval/pass@1": 0.25, "tokens/critic_warmup": 100, "time/critic_warmup_s": 5.0},
               {"iteration": 1, "value/explained_variance": 0.2, "tokens/rollout": 10, "tokens/mc": 0},
               {"iteration": 2, "value/explained_variance": 0.6, "tokens/rollout": 20, "eval/pass@1": 0.5,
                "time/elapsed_s": 40.0}]
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "args.json").write_text(json.dumps({"critic": "value", "seed": 3}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = vineppo.summarize_run(str(tmp_path))
    assert row == {"run": str(tmp_path), "critic": "value", "seed": 3, "before": 0.25, "after": 0.5, "gain": 0.25,
                   "credit_ev": pytest.approx(0.4), "seconds": 45.0, "tokens": 130}
    grpo = dict(row, critic="grpo", credit_ev=None)
    vineppo.print_summary([row, dict(row, gain=0.35), grpo])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 3 + 1  # header, 3 runs, one mean (value has 2 runs)
    assert "+0.300" in lines[-1] and "0.40" in lines[-1] and " n/a " in lines[3]


def test_evaluation_has_its_own_random_stream(monkeypatch):
    """pass@1 at an iteration does not depend on the training's random state (so runs of one seed that differ
    only in the critic start from the same pass@1), and evaluating does not advance that state."""
    monkeypatch.setattr(vineppo, "reward_of", lambda task, text, ended, answer: parity_grader(text, answer))
    tok = vineppo.build_tiny_tokenizer()
    args = vineppo.Args(task="arith", eval_samples=4, max_new_tokens=8, seed=5)
    test = vineppo.make_arith_task(0, 10, 6, 0.0)[1]
    run = vineppo.Run(tok, vineppo.build_tiny_model(tok, seed=0).eval(), None, None, [], [], [], [], test,
                      torch.device("cpu"))
    scores = []
    for training_seed in (1, 2):
        torch.manual_seed(training_seed)
        record = {"iteration": 3}
        vineppo.evaluate_into(record, run, args)
        scores.append(record["eval/pass@1"])
        untouched = torch.rand(3)
        torch.manual_seed(training_seed)
        assert torch.equal(untouched, torch.rand(3)), "evaluation advanced the training's random stream"
    assert scores[0] == scores[1] and 0 < scores[0] < 1


def test_train_subset_evaluation_is_a_fixed_subset_and_leaves_test_pass_at_1_alone(monkeypatch):
    """--eval-train-problems N adds eval/train_pass@1 on the first N training problems; pass@1 on the test
    problems is the same with and without it, and off (0) adds nothing."""
    monkeypatch.setattr(vineppo, "reward_of", lambda task, text, ended, answer: float(answer in ("0", "1", "3")))
    tok = vineppo.build_tiny_tokenizer()
    train = [{"problem": f"Start at {i}: +1.", "answer": str(i)} for i in range(6)]
    test = [{"problem": "Start at 7: +1.", "answer": "1"}, {"problem": "Start at 9: +1.", "answer": "2"}]
    run = vineppo.Run(tok, vineppo.build_tiny_model(tok, seed=0).eval(), None, None, [], [], train, [], test,
                      torch.device("cpu"))
    records = []
    for n in (0, 4, 2):
        record = {"iteration": 2}
        vineppo.evaluate_into(record, run, vineppo.Args(task="arith", eval_samples=2, max_new_tokens=4,
                                                        eval_train_problems=n))
        records.append(record)
    assert "eval/train_pass@1" not in records[0]
    assert records[0]["eval/pass@1"] == records[1]["eval/pass@1"] == records[2]["eval/pass@1"] == 0.5
    assert records[1]["eval/train_pass@1"] == 0.75  # the first four: answers 0, 1, 3 of 0..3 earn 1
    assert records[2]["eval/train_pass@1"] == 1.0  # the first two: 0 and 1


def test_rl_from_a_saved_sft_model_repeats_the_run_that_trained_it(tmp_path, monkeypatch):
    """SFT + RL in one run, and RL alone from that run's saved SFT model (--model DIR --sft-epochs 0), log the
    same metrics: RL's random stream starts from the seed after SFT (how the README's 3 seeds x 4 critics
    table reuses one SFT model per seed)."""
    monkeypatch.setattr(vineppo, "grade_gsm8k", parity_grader)
    flags = TINY_RUN + ["--task", "arith", "--critic", "value", "--critic-warmup", "1", "--value-lr", "1e-3"]
    flags[flags.index("--sft-epochs") + 1] = "0.2"
    vineppo.main(flags + ["--iterations", "0", "--output-dir", str(tmp_path / "sft")])
    flags[flags.index("--iterations") + 1] = "1"
    whole = vineppo.main(flags + ["--output-dir", str(tmp_path / "whole")])
    flags[flags.index("--sft-epochs") + 1] = "0"
    alone = vineppo.main(flags + ["--model", str(tmp_path / "sft" / "final"), "--output-dir", str(tmp_path / "alone")])

    def untimed(history):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]
    assert untimed(whole["history"]) == untimed(alone["history"])
    assert whole["before"] == alone["before"] and whole["after"] == alone["after"]
