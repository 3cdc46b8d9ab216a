"""Grading cost of MATH rollouts: what `grade_math` costs per call, with and without its caches (a benchmark
that prints figures, not a test).

    OMP_NUM_THREADS=1 python tests/bench_grading.py [REPO_DIR]   # REPO_DIR: the vineppo.py to time (default: this one)

Give REPO_DIR a checkout of an older commit (e.g. `git worktree add /tmp/old cafe8c6`) to time its grader on the
same sample.

Sample: 200 'problems' (distinct golds of tests/test_grading.py's MATH rows); per problem 16 rollouts whose
final line boxes an answer drawn from the table's answers to that gold (right and wrong forms) plus two
answers to other problems, after ~1,500 characters of MATH-style reasoning that varies per rollout. So
texts are all distinct while final answers repeat, as among the K=9 rollouts of one state.
"""
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = sys.argv[1] if len(sys.argv) > 1 else str(ROOT)
sys.path.insert(0, REPO)
import vineppo  # noqa: E402 - the one under test, imported before the table's own import

sys.path.insert(0, str(ROOT / "tests"))
from test_grading import CASES  # noqa: E402

SENTENCES = [
    r"Let $x$ be the number of apples, so $3x + 2 = 17$ and $x = 5$.",
    r"We expand $(a+b)^2 = a^2 + 2ab + b^2$ and substitute $a = 2$, $b = 3$ to get $25$.",
    r"The area of the triangle is $\frac{1}{2} \cdot 6 \cdot 4 = 12$ square units.",
    r"Since $\sqrt{49} = 7$, the side length is $7$, and the perimeter is $4 \cdot 7 = 28$.",
    r"By the quadratic formula, $x = \frac{-b \pm \sqrt{b^2 - 4ac}}{2a}$ with $a=1$, $b=-5$, $c=6$.",
    r"Dividing both sides by $4$, we find $y = \frac{15}{4}$, which is $3.75$.",
    r"There are $\binom{6}{2} = 15$ ways to choose the pair, out of $36$ outcomes in total.",
    r"Note that $2^{10} = 1024$, so the remainder of $2^{10}$ modulo $7$ is $2$.",
    r"The slope of the line through $(1, 2)$ and $(3, 8)$ is $\frac{8-2}{3-1} = 3$.",
    r"Thus the sum of the roots is $-\frac{b}{a} = 5$ and their product is $\frac{c}{a} = 6$.",
    r"Next we check the boundary case $x = 0$, where the expression equals $1$.",
    r"Multiplying out, $(x-2)(x-3) = x^2 - 5x + 6$, which matches the given polynomial.",
]



def sample(seed=0, problems=200, per_problem=16):
    rng = random.Random(seed)
    math_rows = [(c[2], c[3]) for c in CASES if c[0] == "math" and "Putting it together" in c[2]]
    answers_by_gold = {}
    for response, gold in math_rows:
        answers_by_gold.setdefault(gold, []).append(response)
    golds = sorted(answers_by_gold)[:problems]
    every_answer = [r for r, _ in math_rows]
    pairs = []
    for gold in golds:
        pool = answers_by_gold[gold] + rng.sample(every_answer, 2)
        for _ in range(per_problem):
            reasoning = "\n".join(rng.choices(SENTENCES, k=20)) + f"\nWe also get {rng.randint(1, 99)} here."
            pairs.append((reasoning + "\n" + rng.choice(pool), gold))
    return pairs


def timed(pairs):
    start = time.perf_counter()
    rewards = [vineppo.grade_math(text, gold) for text, gold in pairs]
    return (time.perf_counter() - start) / len(pairs) * 1e3, rewards


cached = vineppo.math_equal


def fresh_worker():
    """Kill the grading worker, so the next call forks a new one with empty caches (old grader: sympy's)."""
    pool_name = "_math_pool" if hasattr(vineppo, "_math_pool") else "_sympy_pool"
    if getattr(vineppo, pool_name) is not None:
        getattr(vineppo, pool_name).terminate()
        setattr(vineppo, pool_name, None)
    vineppo.grade_math(r"$\boxed{2\sqrt{2}}$", r"\sqrt{8}")  # start it outside the timing
    cached.cache_clear()


pairs = sample()
print(f"{REPO}: {len(pairs)} pairs, {len(set(p[1] for p in pairs))} golds, "
      f"mean length {statistics.mean(len(t) for t, _ in pairs):.0f} chars")
parse_cache = getattr(vineppo, "_parse_math", None)
vineppo.math_equal = cached.__wrapped__  # no (answer, gold) cache: every call does the whole check
if parse_cache:
    vineppo._parse_math = parse_cache.__wrapped__  # and no parse cache in the worker (set before the fork)
fresh_worker()
ms_off, rewards_off = timed(pairs)
vineppo.math_equal = cached
if parse_cache:
    vineppo._parse_math = parse_cache
fresh_worker()  # caches on, all cold at the start, as in one iteration on new problems
ms_on, rewards_on = timed(pairs)
assert rewards_on == rewards_off
info = cached.cache_info()
print(f"no cache: {ms_off:.2f} ms per call | caches on (cold): {ms_on:.2f} ms per call, {info.hits} hits / "
      f"{info.misses} misses | projected for 20,000 MC rollouts: {20000 * ms_on / 1e3:.1f} s (caches), "
      f"{20000 * ms_off / 1e3:.1f} s (no cache) | reward mean {statistics.mean(rewards_on):.3f}")
