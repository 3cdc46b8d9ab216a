"""Nothing lost: resume equals the uninterrupted run, Ctrl-C saves a checkpoint, a NaN is skipped, every bad
input gets one clear line, and the graders survive any string."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN, parity_grader  # noqa: E402

RUN = TINY_RUN[:]
RUN[RUN.index("--iterations") + 1] = "3"  # stopped after 1, resumed for 2 and 3


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (they differ between any two runs)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def interrupt_after(iteration: int, monkeypatch):
    """Deliver a real SIGINT to this process right after `iteration` is logged (as Ctrl-C would)."""
    log = vineppo.log_metrics

    def log_then_interrupt(args, record):
        log(args, record)
        if record["iteration"] == iteration:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(vineppo, "log_metrics", log_then_interrupt)


# ============================================================================================
# 1-3. Checkpoints, resume, interrupts
# ============================================================================================
@pytest.mark.parametrize("critic", ["mc", "value"])
def test_resume_equals_the_uninterrupted_run(critic, tmp_path, monkeypatch):
    monkeypatch.setattr(vineppo, "grade_gsm8k", parity_grader)  # rewards that vary, so every step trains
    flags = RUN + ["--critic", critic, "--save-every", "100"]
    whole = vineppo.main(flags + ["--output-dir", str(tmp_path / "whole")])

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    with monkeypatch.context() as patch:
        interrupt_after(1, patch)
        with pytest.raises(SystemExit) as stopped:
            vineppo.main(flags + ["--output-dir", str(tmp_path / "split")])
    assert stopped.value.code == 128 + signal.SIGINT
    assert [r["iteration"] for r in metrics(tmp_path / "split")] == [0, 1]
    assert signal.getsignal(signal.SIGINT) is before, "the handlers must be put back"

    resumed = vineppo.main(["--output-dir", str(tmp_path / "split"), "--resume"])
    assert metrics(tmp_path / "split") == metrics(tmp_path / "whole")  # iterations 2 and 3 included
    for (name, a), b in zip(whole["policy"].named_parameters(), resumed["policy"].parameters()):
        assert torch.equal(a, b), name
    if critic == "value":
        for a, b in zip(whole["value_model"].parameters(), resumed["value_model"].parameters()):
            assert torch.equal(a, b)


def test_checkpoint_holds_everything_to_resume(tmp_path):
    vineppo.main(TINY_RUN + ["--iterations", "1", "--critic", "value", "--output-dir", str(tmp_path)])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 1
    assert {"policy", "reference", "value", "optimizers", "schedulers", "rng", "sampler", "history", "args"} <= set(checkpoint)
    assert {"python", "torch"} <= set(checkpoint["rng"]) and len(checkpoint["optimizers"]) == 2
    assert [r["iteration"] for r in checkpoint["history"]] == [0, 1]
    assert not list(tmp_path.glob("*.tmp")), "no temporary file may stay behind"


def test_a_crash_while_writing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    vineppo.main(TINY_RUN + ["--iterations", "1", "--output-dir", str(tmp_path)])
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def crash(obj, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        vineppo.main(["--output-dir", str(tmp_path), "--resume", "--iterations", "2"])
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    vineppo.main(TINY_RUN + ["--iterations", "1", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="keeps its settings; drop --lr"):
        vineppo.parse_args(["--output-dir", str(tmp_path), "--resume", "--lr", "0.5"])
    args = vineppo.parse_args(["--output-dir", str(tmp_path), "--resume", "--iterations", "5"])
    assert args.iterations == 5 and args.lr == 1e-3 and args.resume == str(tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="no checkpoint at"):
        vineppo.parse_args(["--output-dir", str(tmp_path / "elsewhere"), "--resume"])
    # the command that started the run, repeated with --resume, is accepted (--task auto, the model name)
    assert vineppo.parse_args(["--output-dir", str(tmp_path), "--resume", "--task", "auto", "--model", "tiny"]).resume
    # resuming into ANOTHER run's directory would overwrite it: refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"iteration": 0}\n')
    with pytest.raises(SystemExit, match="already holds a run"):
        vineppo.main(["--resume", str(tmp_path / "checkpoint.pt"), "--output-dir", str(other)])


def run_cli(*flags, cwd, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "vineppo.py"), *flags], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigint_mid_run_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch, capsys):
    flags = TINY_RUN + ["--iterations", "4", "--output-dir", "out"]
    proc = run_cli(*flags, cwd=tmp_path)
    log = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and '"iteration": 1' in log.read_text()):  # wait for RL to be under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "continue with: python vineppo.py --output-dir out --resume" in err and "Traceback" not in err
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    stopped_at = checkpoint["iteration"]
    assert 1 <= stopped_at < 4
    assert [r["iteration"] for r in checkpoint["history"]] == list(range(stopped_at + 1))

    monkeypatch.chdir(tmp_path)  # the command it printed, in this process (the script's own start is tested above)
    vineppo.main(["--output-dir", "out", "--resume"])
    assert f"resumed out/checkpoint.pt after iteration {stopped_at}" in capsys.readouterr().out
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == list(range(5))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    code = ("import os, signal, sys, time; sys.path.insert(0, %r); import vineppo; stop = vineppo.StopSignals(); "
            "os.kill(os.getpid(), signal.SIGINT); assert stop.received == signal.SIGINT; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(60)" % str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "saving a checkpoint" in proc.stderr and "again: exiting now" in proc.stderr


# ============================================================================================
# 4. Numerical safety
# ============================================================================================
def poison_k3(monkeypatch, calls_to_poison):
    """k3_kl returns NaN on the given calls (counted from 1): the loss of those micro-batches is NaN."""
    real, count = vineppo.k3_kl, {"n": 0}

    def k3(*args):
        count["n"] += 1
        out = real(*args)
        return out * float("nan") if count["n"] in calls_to_poison else out
    monkeypatch.setattr(vineppo, "k3_kl", k3)


def test_an_injected_nan_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(vineppo, "grade_gsm8k", parity_grader)
    poison_k3(monkeypatch, {1})  # the first micro-batch of the first minibatch of iteration 1
    result = vineppo.main(RUN + ["--iterations", "2", "--output-dir", str(tmp_path)])
    records = metrics(tmp_path)
    assert records[1]["losses/nonfinite_steps"] == 1 and records[2]["losses/nonfinite_steps"] == 0
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert vineppo.all_finite(result["policy"])
    assert any(not torch.equal(a, b) for a, b in zip(result["policy"].parameters(), result["reference"].parameters()))


def test_nans_in_a_row_stop_the_run_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(vineppo, "grade_gsm8k", parity_grader)
    poison_k3(monkeypatch, set(range(1, 10_000)))
    with pytest.raises(SystemExit) as stopped:
        vineppo.main(RUN + ["--output-dir", str(tmp_path)])
    message = str(stopped.value.code)
    assert "3 optimizer steps in a row had a non-finite loss" in message and "(iteration 0)" in message
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 0
    for name, weight in checkpoint["policy"].items():  # nothing of the NaN reached the saved weights
        assert torch.isfinite(weight).all() and torch.equal(weight, checkpoint["reference"][name]), name


def test_the_nonfinite_streak_spans_iterations(tmp_path, monkeypatch):
    """One optimizer step per iteration (1 epoch, one minibatch), NaN every time: the third in a row stops
    the run, although no single iteration had three."""
    monkeypatch.setattr(vineppo, "grade_gsm8k", parity_grader)
    poison_k3(monkeypatch, set(range(1, 10_000)))
    with pytest.raises(SystemExit) as stopped:
        vineppo.main(RUN + ["--epochs", "1", "--minibatch-size", "16", "--micro-batch-size", "16",
                            "--output-dir", str(tmp_path)])
    assert "3 optimizer steps in a row" in str(stopped.value.code) and "in iteration 3" in str(stopped.value.code)
    assert [r["losses/nonfinite_in_a_row"] for r in metrics(tmp_path)[1:]] == [1, 2]


# ============================================================================================
# 5. Bad input: one line that says what to do, a non-zero exit, nothing written
# ============================================================================================
def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GSM8K_ROW = {"question": "Tom has 3 apples and buys 4. How many now?", "answer": "3+4=7\n#### 7"}


def bad_inputs(tmp: Path) -> dict:
    """case -> (flags, words the one-line error must contain)."""
    gsm8k = ["--model", "tiny", "--task", "gsm8k", "--dataset-path"]
    (tmp / "a_file").write_text("x")
    (tmp / "taken").mkdir()
    (tmp / "taken" / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "not_json.jsonl").write_text("this is not json {\n")
    return {
        "unknown model": (["--model", "no-such-org/no-such-model", "--task", "arith"], "could not load --model"),
        "missing model directory": (["--model", "./no_such_checkpoint"], "no such directory"),
        "unknown task": (["--task", "chess"], "--task must be one of arith, gsm8k, math; got 'chess'"),
        "K < 1": (["--mc-rollouts", "0"], "--mc-rollouts must be at least 1"),
        "negative lr": (["--lr", "-0.001"], "--lr must be positive"),
        "zero samples": (["--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
        "minibatch larger than the batch": (["--minibatch-size", "100000"], "larger than the batch"),
        "negative save interval": (["--save-every", "-1"], "cannot be negative"),
        "empty dataset": (gsm8k + [str(tmp / "empty.jsonl")], "is empty"),
        "missing dataset file": (gsm8k + [str(tmp / "missing.jsonl")], "no such file"),
        "dataset file not JSON": (gsm8k + [str(tmp / "not_json.jsonl")], "as JSON lines"),
        "dataset lacks fields": (gsm8k + [jsonl(tmp / "fields.jsonl", [{"prompt": "x", "completion": "y"}])],
                                 "lack the field"),
        "no row has a gold answer": (gsm8k + [jsonl(tmp / "nogold.jsonl", [{"question": "q", "answer": "no answer"}])],
                                     "no row with a problem and a gold final answer"),
        "output dir holds a run": (["--output-dir", str(tmp / "taken")], "already holds a run"),
        "output dir not writable": (["--output-dir", str(tmp / "a_file" / "run")], "cannot write to --output-dir"),
        "prompt longer than the context": (["--prompts-per-iteration", "1", "--minibatch-size", "8"] + gsm8k + [",".join([jsonl(tmp / "long.jsonl", [{**GSM8K_ROW, "question": "x" * 600}])] * 2)],
                                           "exceeds the model's context of 512 tokens"),
        "resume without a checkpoint": (["--output-dir", str(tmp / "fresh"), "--resume"], "no checkpoint at"),
        "cuda without CUDA": (["--device", "cuda"], "no CUDA GPU"),
        "more prompts per iteration than problems": (["--train-problems", "10", "--prompts-per-iteration", "64"],
                                                     "training problems; lower it"),
    }


BAD_INPUTS = ["unknown model", "missing model directory", "unknown task", "K < 1", "negative lr", "zero samples",
              "minibatch larger than the batch", "negative save interval", "empty dataset", "missing dataset file",
              "dataset file not JSON", "dataset lacks fields", "no row has a gold answer", "output dir holds a run",
              "output dir not writable", "prompt longer than the context", "resume without a checkpoint",
              "cuda without CUDA", "more prompts per iteration than problems"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line(case, tmp_path, monkeypatch):
    from huggingface_hub import constants
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # an unknown name fails at once, offline
    monkeypatch.chdir(tmp_path)
    table = bad_inputs(tmp_path)
    assert list(table) == BAD_INPUTS
    flags, words = table[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as refused:
        vineppo.main(flags + (["--output-dir", "out"] if "--output-dir" not in flags else []))
    message = str(refused.value.code)
    assert refused.value.code not in (0, None)
    assert message.startswith("error: ") and words in message, message
    assert "\n" not in message, "one line"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


def test_rows_without_a_gold_answer_are_skipped_and_counted(tmp_path, capsys):
    rows = [GSM8K_ROW, {"question": "q", "answer": "no final answer"}, {"question": None, "answer": "#### 3"}]
    problems = vineppo.load_problems("gsm8k", [dict(path="json", data_files=jsonl(tmp_path / "d.jsonl", rows),
                                                     split="train")])
    assert [p["answer"] for p in problems] == ["7"]
    assert "skipped 2 of 3 rows" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "\n", "no steps and no answer", "####", "#### \n", "\u200b" * 5, "$x$"])
def test_odd_generations_are_ordinary_data(text):
    """Empty, stepless or answerless responses go through grading, splitting and credit like any other:
    reward 0, steps that re-join, one advantage per token; never an exception."""
    tokenizer = vineppo.build_tiny_tokenizer()
    decode = lambda ids: vineppo.decode_response(tokenizer, ids)  # noqa: E731
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for task in ("arith", "gsm8k", "math"):
        reward = vineppo.reward_of(task, decode(ids), True, "7")
        assert reward == 0.0
        steps = vineppo.split_response(task, decode(ids))
        assert "".join(steps) == decode(ids)
        starts = vineppo.step_token_starts(decode, ids, steps)
        advantages = vineppo.step_advantages([0.5] * len(starts), reward, n_steps=len(starts))
        assert len(vineppo.token_advantages(advantages, starts, len(ids))) == len(ids)


# ============================================================================================
# 6. Graders never crash or hang
# ============================================================================================
PIECES = ["\\boxed{", "\\fbox{", "}", "{", "$", "$$", "\\frac", "\\dfrac", "\\sqrt", "\\left(", "\\right)", "[", "]",
          "(", ")", ",", "=", "####", "\n", " ", ".", "-", "^", "_", "\\pi", "\\infty", "\\text{cm}", "%", "\\%",
          "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "9" * 40, "1e999", "0.000", "1,000", "x", "é", "😀",
          "\u202e", "\x00", "\\", "^{9^{9^{9}}}", "\\circ", "°", "<<", ">>", "\\(", "\\)", "\\[", "\\]"]


def fuzz_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30))) for _ in range(n)]
    texts += ["\\boxed{" * 3000 + "1" + "}" * 3000, "(" * 3000 + "1,2" + ")" * 3000, "{" * 5000, "$" * 5001,
              "\\frac{" * 2000, "####" + "9" * 5000, "\n" * 5000, "".join(map(chr, range(0x2000, 0x3000)))]
    return texts


def test_graders_and_splitters_survive_any_string():
    """Thousands of odd strings through every grader and splitter: no exception, no call over 10 s (the
    SIGALRM below would raise inside a hang), rewards in {0, 1}, steps that re-join."""
    def too_slow(signum, frame):
        raise TimeoutError("a grader call ran over 10 s")
    previous = signal.signal(signal.SIGALRM, too_slow)
    texts = fuzz_strings(3000)
    golds = ["7", "\\frac{1}{2}", "(1,2)", "x^2", "\\begin{pmatrix}1&2\\end{pmatrix}"] + texts[:40]
    rng = random.Random(1)
    try:
        for text in texts:
            gold = rng.choice(golds)
            signal.alarm(10)
            for task in ("gsm8k", "math"):
                assert vineppo.grade(task, text, gold) in (0.0, 1.0)
                assert "".join(vineppo.split_response(task, text)) == text
            vineppo.math_final_answer(text)
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
