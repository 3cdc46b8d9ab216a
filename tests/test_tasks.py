"""Real tasks offline: GSM8K rows, local JSONL data through the real-model
path (a tiny Qwen2-shaped model saved to disk with a trained byte-level BPE), model names, the hub check."""

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402

QWEN_DIR = ROOT.parent / "shared" / "qwen2.5-tokenizer"


# ============================================================================================
# 1. GSM8K rows (the graders are tested in test_grading.py)
# ============================================================================================
def test_gsm8k_rows_lose_calculator_annotations():
    row = {"question": " Q?\n", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}
    problem = vineppo.to_problem("gsm8k", row)
    assert problem == {"problem": "Q?", "solution": "She sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n#### 72", "answer": "72"}
    math_row = {"problem": "P", "solution": r"So $\boxed{\frac{1}{2}}$."}
    assert vineppo.to_problem("math", math_row)["answer"] == r"\frac{1}{2}"
    assert vineppo.to_problem("math", {**math_row, "answer": "0.5"})["answer"] == "0.5"
    two_boxes = {"problem": "P", "solution": r"So $x = \boxed{2}$ and $y = \boxed{3}$."}
    assert vineppo.to_problem("math", two_boxes)["answer"] == "2, 3"  # joined, as the official extraction
    assert not vineppo.to_problem("math", {"problem": "P", "solution": "no box, 5"})["answer"]  # skipped later


# ============================================================================================
# 2. Local JSONL data through the real-model path, both critics
# ============================================================================================
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = i + 2, rng.randint(2, 9)  # distinct problems
        rows.append({"question": f"Tom has {a} bags with {b} apples each. How many apples?",
                     "answer": f"He has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} apples.\n#### {a * b:,}"})
    return rows


def math_rows(n: int, seed: int, with_answer: bool) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = i + 1, rng.randint(2, 9)
        row = {"problem": f"Compute $\\frac{{{a}}}{{{b}}} + 1$.", "level": "Level 1", "type": "Algebra",
               "solution": f"We have $\\frac{{{a}}}{{{b}}} + 1 = \\frac{{{a + b}}}{{{b}}}$. "
                           f"So the answer is $\\boxed{{\\frac{{{a + b}}}{{{b}}}}}$."}
        if with_answer:  # MATH-500's fields
            row["answer"] = f"\\frac{{{a + b}}}{{{b}}}"
        rows.append(row)
    return rows


def bpe_tokenizer():
    """A byte-level BPE trained in-process on solution-like text, saved with the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(200, 0)]
    corpus += [r["problem"] + "\n" + r["solution"] for r in math_rows(200, 0, False)]
    corpus += [vineppo.make_prompt("")] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", padding_side="left",
                                   clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])


def saved_model_dir(tmp_path_factory, name: str, tokenizer) -> str:
    """A tiny Qwen2-shaped model with random weights, saved like a hub checkpoint (no pad token: EOS pads)."""
    path = tmp_path_factory.mktemp(name)
    vineppo.build_tiny_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    return saved_model_dir(tmp_path_factory, "bpe-model", bpe_tokenizer())


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    return {"gsm8k": write_jsonl(path / "gsm8k_train.jsonl", gsm8k_rows(40, 1)) + ","
            + write_jsonl(path / "gsm8k_test.jsonl", gsm8k_rows(6, 2)),
            "math": write_jsonl(path / "math_train.jsonl", math_rows(40, 3, with_answer=False)) + ","
            + write_jsonl(path / "math_test.jsonl", math_rows(6, 4, with_answer=True))}


TINY_FLAGS = ["--iterations", "2", "--prompts-per-iteration", "2", "--samples-per-prompt", "4", "--minibatch-size", "8",
              "--micro-batch-size", "4", "--sft-epochs", "0.2", "--sft-batch-size", "8", "--sft-lr", "1e-3",
              "--eval-samples", "1", "--eval-problems", "2", "--mc-rollouts", "2", "--max-new-tokens", "24",
              "--eval-every", "1", "--lr", "1e-3", "--validation-size", "4", "--device", "cpu", "--offload-reference",
              "--gradient-checkpointing"]


def run_local(monkeypatch, out, model_dir, task, dataset, critic, extra=()):
    """Two iterations through `main`, graded by a parity spy on the task's grader (a random model never
    answers right, and every advantage would be 0); records which grader and splitter ran."""
    calls = {"grade_gsm8k": 0, "grade_math": 0, "split_steps": 0, "split_math_steps": 0}

    def spy(name, parity):
        real = getattr(vineppo, name)

        def wrapped(*a):
            calls[name] += 1
            return float(sum(map(ord, a[0])) % 2) if parity else real(*a)
        monkeypatch.setattr(vineppo, name, wrapped)
    for name in calls:
        spy(name, parity=name.startswith("grade"))
    real_sampler = vineppo.sample_continuations

    def always_ends(model, prefixes, budgets, *, eos_id, **kw):  # a random model almost never ends, and a
        out = real_sampler(model, prefixes, budgets, eos_id=eos_id, **kw)  # cut response is never graded:
        return [(ids if ended else ids[:-1] + [eos_id], True) for ids, ended in out]  # its last token -> EOS
    monkeypatch.setattr(vineppo, "sample_continuations", always_ends)
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("a local run must not touch the network"))
    result = vineppo.main(["--model", model_dir, "--task", task, "--dataset-path", dataset, "--critic", critic,
                           "--output-dir", str(out)] + TINY_FLAGS + list(extra))
    return result, calls


@pytest.mark.parametrize("task", ["gsm8k", "math"])
@pytest.mark.parametrize("critic", ["mc", "value"])
def test_local_jsonl_runs_each_critic(task, critic, monkeypatch, tmp_path, bpe_model_dir, data_files):
    result, calls = run_local(monkeypatch, tmp_path / "out", bpe_model_dir, task, data_files[task], critic)
    other = "gsm8k" if task == "math" else "math"
    assert calls[f"grade_{task}"] > 0 and calls[f"grade_{other}"] == 0, calls  # the task's grader, threaded through
    split = "split_math_steps" if task == "math" else "split_steps"
    assert calls[split] > 0 and calls["split_steps" if task == "math" else "split_math_steps"] == 0, calls
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["eval/pass@1"]) and math.isfinite(r["eval/val_pass@1"]) for r in records)
    assert all(math.isfinite(r["losses/policy_loss"]) for r in records[1:])
    start = dict(result["reference"].named_parameters())
    assert next(iter(start.values())).device.type == "cpu"  # the offloaded reference stays on the CPU
    changed = [not torch.equal(p, start[name]) for name, p in result["policy"].named_parameters()]
    assert all(changed), "every policy parameter must have moved"


def test_local_jsonl_with_the_real_qwen_tokenizer(monkeypatch, tmp_path, tmp_path_factory, data_files):
    if not QWEN_DIR.exists():
        pytest.skip("../shared/qwen2.5-tokenizer/ is not here")
    from transformers import AutoTokenizer
    model_dir = saved_model_dir(tmp_path_factory, "qwen-model", AutoTokenizer.from_pretrained(QWEN_DIR))
    # MATH and VinePPO: the splitter and the MC states on real BPE tokens; top-p 1, one iteration, no validation:
    # sampling over 151k logits dominates this test on a CPU
    _, calls = run_local(monkeypatch, tmp_path, model_dir, "math", data_files["math"], "mc",
                         extra=["--top-p", "1.0", "--iterations", "1", "--validation-size", "0"])
    assert calls["grade_math"] > 0 and calls["split_math_steps"] > 0


def test_validation_is_held_out_of_train_and_fixed(data_files):
    args = vineppo.parse_args(["--model", "x/y", "--task", "gsm8k", "--dataset-path", data_files["gsm8k"],
                               "--validation-size", "5"])
    train, validation, test = vineppo.load_task(args)
    assert (len(train), len(validation), len(test)) == (35, 5, 6)
    assert not {p["problem"] for p in validation} & {p["problem"] for p in train}
    args.seed = 7
    assert vineppo.load_task(args)[1] == validation  # the split does not depend on --seed
    args.validation_size = -1  # paper: 5% of GSM8K, at most a tenth
    assert len(vineppo.load_task(args)[1]) == 2
    args.dataset_path = data_files["gsm8k"].split(",")[0]  # no test file: validation doubles as the test set
    train, validation, test = vineppo.load_task(args)
    assert test is validation and len(train) == 38
    assert all(p["answer"] and "<<" not in p["solution"] for p in train)


# ============================================================================================
# 3. Model names, tokenizers, arguments
# ============================================================================================
@pytest.mark.parametrize("name, resolved", [
    ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"), ("Qwen2.5-Math-1.5B", "Qwen/Qwen2.5-Math-1.5B"),
    ("rho-1b-sft-GSM8K", "realtreetune/rho-1b-sft-GSM8K"), ("rho-math-1b-v0.1", "microsoft/rho-math-1b-v0.1"),
    ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B"), ("gemma-2-2b", "google/gemma-2-2b"),
    ("deepseek-math-7b-base", "deepseek-ai/deepseek-math-7b-base"), ("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),
    ("realtreetune/rho-1b-sft-MATH", "realtreetune/rho-1b-sft-MATH"), ("gpt2", "gpt2"), ("tiny", "tiny"),
])
def test_resolve_model_name(name, resolved):
    assert vineppo.resolve_model_name(name) == resolved


def test_local_directory_is_never_renamed(tmp_path, monkeypatch):
    (tmp_path / "Qwen2.5-0.5B").mkdir()
    monkeypatch.chdir(tmp_path)
    assert vineppo.resolve_model_name("Qwen2.5-0.5B") == "Qwen2.5-0.5B"


def test_task_default_depends_on_the_model():
    assert vineppo.parse_args([]).task == "arith"
    assert vineppo.parse_args(["--model", "Qwen2.5-0.5B"]).task == "gsm8k"
    args = vineppo.parse_args(["--model", "Qwen2.5-0.5B", "--task", "math"])
    assert (args.model, args.output_dir) == ("Qwen/Qwen2.5-0.5B", os.path.join("runs", "math-mc-seed0"))


def test_tokenizer_without_eos_or_pad_gets_them(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    bare = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False)
    vineppo.build_tiny_model(bare, seed=0).save_pretrained(tmp_path)
    bare.save_pretrained(tmp_path)
    model, tok = vineppo.load_model_and_tokenizer(vineppo.Args(model=str(tmp_path)), torch.device("cpu"))
    assert tok.eos_token_id is not None and tok.pad_token_id == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok) and tok.padding_side == "left"


def test_prompt_never_ends_with_eos():
    class AppendsEos:  # like a tokenizer configured with add_eos_token=True
        eos_token_id = 9

        def __call__(self, texts):  # a list of texts -> a list of ids each
            return {"input_ids": [[1] + [5] * len(text) + [9] for text in texts]}
    assert vineppo.encode_prompt(AppendsEos(), "p") == [1] + [5] * len(vineppo.make_prompt("p"))
    assert [len(ids) for ids in vineppo.encode_prompts(AppendsEos(), ["p", "pq"])] == [
        1 + len(vineppo.make_prompt("p")), 1 + len(vineppo.make_prompt("pq"))]
    assert vineppo.encode_prompts(AppendsEos(), []) == []


# ============================================================================================
# 4. No network: a fast, clear error (an unreachable hub simulated by a closed local port)
# ============================================================================================
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(flags, cwd, env=None):
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "vineppo.py"), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return time.time() - start, proc


@pytest.fixture(scope="module")
def startup_s(tmp_path_factory):
    """Seconds this machine, as busy as it is now, takes to start the script and refuse a flag (no hub involved)."""
    seconds, proc = timed_run(["--task", "chess"], cwd=tmp_path_factory.mktemp("startup"))
    assert proc.returncode != 0 and "--task must be one of" in proc.stderr
    return seconds


@pytest.mark.parametrize("flags", [["--model", "Qwen2.5-0.5B"], ["--task", "gsm8k"]])
def test_unreachable_hub_fails_fast_with_one_clear_line(flags, tmp_path, startup_s):
    """Seconds beyond starting the script (timed, not assumed: a slow or busy CPU starts it in 5-25 s): a bare
    `from_pretrained` retries for ~46 s and `load_dataset` ~23 s before they fail."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), TQDM_DISABLE="1")
    seconds, proc = timed_run(flags, tmp_path, env)
    assert seconds < startup_s + 15
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot reach the Hugging Face hub" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "--model DIR" in proc.stderr and "--dataset-path" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_hub_check_is_skipped_offline_and_for_local_files(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("no probe expected"))
    vineppo.check_hub_reachable(vineppo.Args(model="tiny", task="arith"))
    vineppo.check_hub_reachable(vineppo.Args(model=str(tmp_path), task="math", dataset_path="x.jsonl"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    vineppo.check_hub_reachable(vineppo.Args(model="Qwen/Qwen2.5-0.5B", task="gsm8k"))
