"""Real tasks offline: MATH and GSM8K grading, MATH step splitting, local JSONL data through the real-model
path (a tiny Qwen2-shaped model saved to disk with a trained byte-level BPE), model names, the hub check."""

import json
import math
import os
import random
import re
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
# 1. MATH grading: a table of hand-written cases
# ============================================================================================
def boxed(answer: str) -> str:
    return "Putting it together, the answer is $\\boxed{" + answer + "}$."


MATH_CASES = [  # (response, gold, reward)
    # fractions, \dfrac, \frac12
    (boxed(r"\frac{1}{2}"), r"\frac12", 1), (boxed(r"\dfrac{1}{2}"), r"\frac{1}{2}", 1),
    (boxed("0.5"), r"\frac{1}{2}", 1), (boxed(r"\tfrac{3}{4}"), "0.75", 1), (boxed("3/4"), r"\frac{3}{4}", 1),
    (boxed(r"\frac{2}{3}"), r"\frac{3}{2}", 0), (boxed(r"-\frac{1}{3}"), r"\frac{-1}{3}", 1),
    (boxed("0.3333"), r"\frac13", 1), (boxed("0.33"), r"\frac13", 0),  # numbers within 1e-3 only
    # square roots and pi (sympy)
    (boxed(r"\sqrt{2}/2"), r"\frac{\sqrt{2}}{2}", 1), (boxed(r"\frac{1}{\sqrt{2}}"), r"\frac{\sqrt2}{2}", 1),
    (boxed(r"2\sqrt{3}"), r"\sqrt{12}", 1), (boxed(r"\sqrt{3}"), r"\sqrt{2}", 0),
    (boxed(r"2\pi"), r"2\pi", 1), (boxed(r"\pi \cdot 2"), r"2\pi", 1), (boxed("6.2832"), r"2\pi", 1),
    (boxed(r"3\pi"), r"2\pi", 0), (boxed("x^2+2x+1"), "(x+1)^2", 1), (boxed("x^2+1"), "(x+1)^2", 0),
    # intervals (brackets matter) and tuples (order matters)
    (boxed(r"(-\infty, 3]"), r"(-\infty,3]", 1), (boxed(r"(-\infty, 3)"), r"(-\infty,3]", 0),
    (boxed("[2, 5)"), "[2,5)", 1), (boxed("(1, 2)"), "(1,2)", 1), (boxed("(2, 1)"), "(1,2)", 0),
    (boxed(r"(1, \frac{1}{2})"), "(1, 0.5)", 1),
    # matrices, element by element
    (boxed(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"), r"\begin{pmatrix}1\\2\end{pmatrix}", 1),
    (boxed(r"\begin{pmatrix} 0.5 & 1 \\ 2 & 3 \end{pmatrix}"), r"\begin{pmatrix} \frac{1}{2} & 1 \\ 2 & 3 \end{pmatrix}", 1),
    (boxed(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"), r"\begin{pmatrix} 1 & 2 \\ 4 & 3 \end{pmatrix}", 0),
    (boxed(r"\begin{bmatrix} 1 \\ 2 \end{bmatrix}"), r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1),
    # units and \text{}, degrees, percentages, dollars
    (boxed(r"5 \text{ cm}"), "5", 1), (boxed(r"12\text{ inches}"), "12", 1), (boxed("5 inches"), "5", 1),
    (boxed(r"\text{(C)}"), r"\text{(C)}", 1), (boxed(r"\text{Monday}"), r"\text{Tuesday}", 0),
    (boxed(r"30^\circ"), "30", 1), (boxed(r"45^{\circ}"), "45", 1), (boxed(r"25\%"), "25", 1),
    (boxed(r"25\%"), "0.25", 0),  # a percentage is not its fraction (as in the Hendrycks grader)
    (boxed(r"\$5"), "5", 1),
    # negative numbers, x = 3, comma lists (any order), thousands, trailing .0
    (boxed("-5"), "-5", 1), (boxed("-5"), "5", 0), (boxed("x = 3"), "3", 1), (boxed("y=-2"), "-2", 1),
    (boxed("1, 2, 3"), "3,2,1", 1), (boxed("1, 2"), "1,2,3", 0), (boxed("-2, 5"), "5, -2", 1),
    (boxed("1,000"), "1000", 1), (boxed("18.0"), "18", 1), (boxed("10"), "10.0", 1), (boxed(".5"), r"\frac12", 1),
    # extraction: the LAST box, braces matched; none or unclosed -> 0; \boxed 5
    ("The answer is 5", "5", 0), (r"First $\boxed{2}$, no wait: $\boxed{\frac{3}{4}}$", r"\frac34", 1),
    (r"so $\boxed{\frac{3}{4}", r"\frac34", 0), (r"so $\boxed 5$.", "5", 1),
    (boxed("ab"), "ba", 0),  # words never reach sympy (there a*b would equal b*a)
]


@pytest.mark.parametrize("response, gold, reward", MATH_CASES)
def test_grade_math_table(response, gold, reward):
    assert vineppo.grade_math(response, gold) == reward


def test_math_table_is_large_and_has_both_outcomes():
    assert len(MATH_CASES) >= 40
    assert sum(r for _, _, r in MATH_CASES) >= 20 and sum(1 - r for _, _, r in MATH_CASES) >= 15


@pytest.mark.parametrize("text, content", [
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"), (r"\boxed{a}{b} \boxed{{c}d}", "{c}d"), (r"\fbox{7}", "7"),
    (r"\boxed{}", None), (r"\boxed{1", None), ("no box", None),
])
def test_last_boxed_matches_braces(text, content):
    assert vineppo.last_boxed(text) == content


def test_sympy_has_a_time_limit():
    """A power tower blocks sympy inside C code; the worker is killed at the limit and the next call works."""
    start = time.time()
    assert vineppo.grade_math(boxed(r"10^{9^{9^{9}}}"), "1") == 0.0
    assert time.time() - start < vineppo.SYMPY_TIMEOUT_S + 5
    assert vineppo.grade_math(boxed(r"2\sqrt{2}"), r"\sqrt{8}") == 1.0  # a fresh worker took over


def test_latex_to_sympy_refuses_anything_but_arithmetic():
    assert vineppo.latex_to_sympy(r"\frac{\sqrt{2}}{2}") == "((sqrt(2))/(2))"
    for text in ["__import__('os')", "Monday", "a_1", r"\text{x}"]:
        assert vineppo.latex_to_sympy(text) is None


# ============================================================================================
# 2. GSM8K grading (the official exact match after removing commas; we also drop '$')
# ============================================================================================
@pytest.mark.parametrize("response, gold, reward", [
    ("48/2 = 24\n#### 1,234", "1234", 1), ("#### 1234", "1,234", 1), ("#### $18", "18", 1), ("#### $1,000.50", "1000.50", 1),
    ("#### 2.5", "2.5", 1), ("#### 18.0", "18", 0),  # decided: string match, as the official grader ("18.0" != "18")
    ("#### -3", "-3", 1), ("#### 3", "-3", 0), ("The answer is 18.", "18", 0), ("18", "18", 0),  # no #### -> 0
])
def test_grade_gsm8k_cases(response, gold, reward):
    assert vineppo.grade_gsm8k(response, gold) == reward


def test_gsm8k_rows_lose_calculator_annotations():
    row = {"question": "Q?", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}
    problem = vineppo.to_problem("gsm8k", row)
    assert problem == {"problem": "Q?", "solution": "She sold 48/2 = 24 clips.\nIn all 48+24 = 72.\n#### 72", "answer": "72"}
    math_row = {"problem": "P", "solution": r"So $\boxed{\frac{1}{2}}$."}
    assert vineppo.to_problem("math", math_row)["answer"] == r"\frac{1}{2}"
    assert vineppo.to_problem("math", {**math_row, "answer": "0.5"})["answer"] == "0.5"


# ============================================================================================
# 3. MATH step splitting: properties over many hand-written solutions
# ============================================================================================
MATH_SOLUTIONS = [
    "We have $x = 2$. Then $y = x + 1 = 3$.\nSo the answer is $\\boxed{3}$.",
    "Let the side be $s$. The area is $s^2 = 49$, so $s = 7$. The perimeter is $4s = \\boxed{28}$.",
    "First, note that\n$$\n\\frac{a}{b} = \\frac{3}{4}.\n$$\nHence $4a = 3b$. Since $a + b = 14$, we get $a = 6$ and $b = 8$.\n"
    "The answer is $\\boxed{6}$.",
    "By Vieta's formulas, the sum of the roots is $-\\frac{b}{a} = 5$ and the product is $\\frac{c}{a} = 6$. "
    "Therefore the roots are $2$ and $3$, and their sum of squares is $4 + 9 = \\boxed{13}$.",
    "We compute \\[\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix} \\begin{pmatrix} 1 \\\\ 1 \\end{pmatrix} = "
    "\\begin{pmatrix} 3 \\\\ 7 \\end{pmatrix}.\\] The answer is $\\boxed{\\begin{pmatrix} 3 \\\\ 7 \\end{pmatrix}}$.",
    "There are $\\binom{5}{2} = 10$ ways to choose two. Of these, $4$ contain the red ball. So the probability "
    "is $\\frac{4}{10} = \\boxed{\\frac{2}{5}}$.",
    "\n\nThe shirt costs \\$20, and the pants cost \\$30. Together, they cost \\$50, which is the answer, $\\boxed{50}$.",
    "Since the triangle is right, by Pythagoras, the hypotenuse is $\\sqrt{3^2 + 4^2} = 5$, and its area, "
    "half the product of the legs, is $6$, so the inradius, area over semiperimeter, is $\\boxed{1}$.",
    "We factor: \\begin{align*}\nx^2 - 5x + 6 &= 0 \\\\\n(x - 2)(x - 3) &= 0.\n\\end{align*}\nThe solutions are "
    "$x = 2$ and $x = 3$. Their product is $\\boxed{6}$.",
    "Ok.",
    "Let $f(x) = 3x + 2$. Then \\(f(4) = 14\\). Also \\(f(f(1)) = f(5) = 17\\). Thus the sum is $14 + 17 = \\boxed{31}$.\n",
    "The long formula here is $a_1 + a_2 + a_3 + a_4 + a_5 + a_6 + a_7 + a_8 + a_9 + a_{10} + a_{11} + a_{12} = "
    "78$, so, since each term is one more than the last, and the first is one, the average, being the middle, "
    "is $6.5$, and the answer is $\\boxed{6.5}$.",
]
SENTENCES = ["Note that $a = b$.", "Then $x^2 = 4$, so $x = 2$.", "We get $$y = \\frac{1}{2}\n+ 3$$ here.",
             "Thus \\(z = 1\\).", "Hence", "A.", "This, in turn, gives, after a short check, a clean value, and so on, "
             "which, again, we write down, carefully, for later, use.", "\\[\n\\sum_{k=1}^n k = \\frac{n(n+1)}{2}\n\\]",
             "So $\\boxed{5}$."]


def random_solution(rng: random.Random) -> str:
    return "".join(rng.choice(SENTENCES) + rng.choice([" ", "\n", "\n\n", ". ", " "]) for _ in range(rng.randint(1, 12)))


ALL_SOLUTIONS = MATH_SOLUTIONS + [random_solution(random.Random(i)) for i in range(200)]


@pytest.mark.parametrize("text", ALL_SOLUTIONS)
def test_split_math_steps_properties(text):
    steps = vineppo.split_math_steps(text)
    assert "".join(steps) == text  # re-join exactly
    for step in steps:  # no boundary inside math: every step holds whole $..$ and \(..\), \[..\] regions
        assert len(re.findall(r"(?<!\\)\$", step)) % 2 == 0, steps
        assert step.count("\\(") == step.count("\\)") and step.count("\\[") == step.count("\\]")
        assert step.count("\\begin{") == step.count("\\end{"), steps
    if len(steps) > 1:
        assert all(len(step) >= 20 for step in steps), steps  # short pieces were merged
    blocked = vineppo.math_blocked(text)
    offset = 0
    for step in steps:  # a long step has nowhere to bisect: no ',' or '=' outside math in its middle half
        n = len(step)
        if n > 100:
            assert not [i for i in range(n // 4 + 1, 3 * n // 4) if step[i - 1] in ",=" and not blocked[offset + i]]
        offset += n


def test_split_math_steps_hand_checked():
    assert vineppo.split_math_steps(MATH_SOLUTIONS[0]) == ["We have $x = 2$. Then $y = x + 1 = 3$.",
                                                           "\nSo the answer is $\\boxed{3}$."]
    steps = vineppo.split_math_steps(MATH_SOLUTIONS[2])
    assert steps[0] == "First, note that\n$$\n\\frac{a}{b} = \\frac{3}{4}.\n$$"  # no cut at the newlines inside $$
    assert vineppo.split_math_steps("Ok.") == ["Ok."]
    long = "This, in turn, gives, after a short check, a clean value, and so on, which, again, we write down, " \
           "carefully, for later, use."
    halves = vineppo.split_math_steps(long)
    assert len(halves) == 2 and all(h for h in halves) and halves[0].endswith(",") and halves[1].startswith(" ")
    assert vineppo.split_response("math", long) == halves and vineppo.split_response("gsm8k", "a\nb") == ["a", "\nb"]


# ============================================================================================
# 4. Local JSONL data through the real-model path, both critics
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
    for task, critic in [("math", "mc"), ("gsm8k", "value")]:
        # top-p 1, one iteration, no validation: sampling over 151k logits dominates this test on a CPU
        _, calls = run_local(monkeypatch, tmp_path / f"{task}-{critic}", model_dir, task, data_files[task], critic,
                             extra=["--top-p", "1.0", "--iterations", "1", "--validation-size", "0"])
        assert calls[f"grade_{task}"] > 0


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
# 5. Model names, tokenizers, arguments
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

        def __call__(self, text):
            return {"input_ids": [1] + [5] * 3 + [9]}
    assert vineppo.encode_prompt(AppendsEos(), "p") == [1, 5, 5, 5]


# ============================================================================================
# 6. No network: a fast, clear error (an unreachable hub simulated by a closed local port)
# ============================================================================================
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags", [["--model", "Qwen2.5-0.5B"], ["--task", "gsm8k"]])
def test_unreachable_hub_fails_fast_with_one_clear_line(flags, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"), TQDM_DISABLE="1")
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "vineppo.py"), *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert time.time() - start < 15
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
