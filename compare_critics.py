"""Do value networks predict the value? Whose gradient points the right way? Two of the paper's analyses, runnable.

Kazemnejad et al., "VinePPO" (arXiv 2410.01679), the analysis of PPO's value network (official code:
src/treetune/analyzers/mc_value_prediction_analyzer.py and mc_value_action_ranking_analyzer.py): on the states
of held-out responses, compare each value estimator with a ground truth V_gt(s), the mean reward of
K_gt = 256 fresh rollouts from s, and test how well each one ranks alternative next steps.

    python compare_critics.py                                # trains the demo's `--critic value` run, then compares
    python compare_critics.py --run runs/arith-value-seed0   # a finished `vineppo.py --critic value` run
    python compare_critics.py --gradients                    # the gradient-variance analysis (below)
    python compare_critics.py --sweep temperature=0.6,1.0    # VinePPO vs PPO vs GRPO over a flag's values (below)
    python compare_critics.py --lengths                      # ... over chain lengths (below)
    python compare_critics.py --help                         # every flag (--gradients --help: that mode's)

States: the prompt state s_0 and every step boundary of responses sampled on held-out problems, built as
`assign_mc_advantages` builds them. s_0 is one state per problem and its value is the problem's difficulty
alone, so, as in the paper's figures, it is reported apart from the other states ("all" pools them).
Estimators: Monte Carlo with K = 1, 3, 9 rollouts that are never part of V_gt (K = 1 and 3 are the first of
the 9); the run's value network, read at the state's last token (the position PPO trains it at); a constant
(the mean V_gt: the best constant, an oracle); and the noise ceiling, a second independent K_gt estimate.
(The official value-prediction analyzer compared the values computed during training, independent of its
ground truth; only its action-ranking analyzer subsampled MC's K from the ground-truth rollouts, which
flatters MC. Here no estimator shares a rollout with V_gt in either test.)
Metrics: MAE, Pearson r, r within a problem (per-problem means removed: knowing only how hard a problem is
scores 0; undefined on s_0), MAE by relative position in the chain; ranking: from a state, sample
continuations, keep each one's first step, keep states with several distinct next steps; a step's truth is
V_gt(s + step); top-1 accuracy (chance = mean of #best / #steps) and pairwise accuracy (pairs tied in V_gt
skipped, an estimator's tie counts 1/2: chance is exactly 0.5). Every figure has a bootstrap 95% interval
(problems resampled, seeded). Writes <output-dir>/results.json (every state's truth and predictions too),
pred_vs_true.png, mae_by_position.png and ranking.png, and prints the table beside the paper's figures.

Gradient variance (`--gradients`). Better credit should mean a less noisy update: the paper's first version
(arXiv 2410.01679v1, abstract) says value networks' poor predictions are "often leading to high-variance
updates". The official code measures it in src/treetune/analyzers/ppo_gradient_variance_analyzer.py: per
checkpoint it draws (by default) 10 random minibatches of 32 of the episodes that checkpoint sampled for
training, forms each one's PPO-loss gradient as the trainer does, and reports their total variance (the
trace of their covariance). A variance has the gradient's scale, which whitening and each method's
advantages change, so here the measure is scale-free: the cosine of one minibatch's gradient to a reference
gradient. Per policy (a short and a long chain):
  - the reference: other problems' responses with MC advantages from K = 16 rollouts per state (K beyond
    16 barely changes it: the responses, not the rollouts, limit it); the cosine c between the gradients of
    its two halves (disjoint problems) says how good it is: about sqrt(2c / (1 + c)) to the true gradient.
    Its noise shrinks every cosine by that same factor, so the batch sizes below do not depend on it;
  - a pool of problems x 8 responses with every method's token advantages: MC with K = 1, 3, 9 (one set of
    9 rollouts per state, training's states, cap and step advantages), and, through `vineppo.assign_credit`
    itself, the value network's GAE, GRPO and RLOO; and a control, "R - V(MC K=9)": the critic's form (GAE
    with lambda = 1, A = R - V(s_i) on every token of step i) with MC K=9's values in place of the network's,
    i.e. what a critic exact at step starts would give;
  - minibatches of B = 16..128 responses (B / 8 whole groups, the same batches for every method), each one's
    gradient formed by `vineppo.minibatch_backward` at ratio 1 (whitening over the minibatch included);
  - the cosine to the reference, mean and spread per method and B; the whole pool as one batch (what this
    pool allows at most); the B each method needs to reach the mean cosine of MC K=9 at B = 32 (interpolated
    in log B); and, per B, each method's mean difference to MC K=9 on the same batches, with its standard
    error (pairing cancels most of the batch-to-batch noise, which is large: read it before the B needed;
    batches are drawn from one pool and share its groups, so these standard errors understate the noise);
  - and, on the same batches, the cosine of each method's gradient to the gradient those very responses give
    with K = 16 step-level MC credit from fresh rollouts, the least noisy credit at hand: how far each credit
    is from it, without the noise of which responses were sampled (which every method shares, and which
    dominates the cosine to the reference). Not an error against a truth: even an exact critic, in GAE's
    form, scores below 1 (the control shows how far). Batches where that gradient is 0 (every response
    right and every value 1, say) have no direction and are left out (counted in the output).
Without --runs it first trains, per chain length (4-6 operations, the demo's task, and 8-10), a `vineppo.py
--critic value --iterations 0` run in run-<chain length>/: SFT (the demo's, for 4-6), then the critic alone
on the SFT policy's rollouts (--critic-warmup), with the demo's settings; the long chain's SFT continues from
the short chain's policy (250 steps), and its tutor slips as often per solution (`training_argv`).
Writes <output-dir>/results.json (every batch's cosine) and gradients.png. The default command took 843 s on
a 2-core AMD EPYC CPU, OMP_NUM_THREADS=2, no other job running (training 211 + 162 s, analysis 158 + 311 s;
of the analysis, the long chain's MC rollouts are the largest part); seconds depend on the CPU and threads.
Harmless choices (`--step-forms N`: the tutor writes each step in one of N equivalent forms, so the SFT policy
keeps real entropy on tokens that decide nothing; the analysis prints the policy's mean entropy on the tokens
that write a step's result and on all others). Outcome credit pushes every harmless choice up or down with the
response's fate, while VinePPO's advantage of a harmless step is about 0. Written before it was run: the
mechanism shows if, on 4-6 operations at B = 32, the same-batch cosine to the K = 16 credit of GRPO and of the
value network each fall by at least 0.05 more than MC K=9's when the forms go from 1 to 4:
    python compare_critics.py --gradients --chain-lengths 4-6 --sft-epochs=-1 --output-dir runs/step-forms-1
    python compare_critics.py --gradients --chain-lengths 4-6 --sft-epochs=-1 --step-forms 4 --output-dir runs/step-forms-4
With 4 forms the demo's SFT reached pass@1 0.035 only (the tiny model mixed the forms and lost the arithmetic), so
the check moves to 2 forms (plain and spaced: the same arithmetic in the same order), written before that run:
the same criterion from 1 to 2 forms, counted only if the 2-form SFT policy reaches pass@1 0.4 and its entropy
on the tokens that do not write a result is at least 0.05 nats (else the dial did not turn, and nothing is said):
    python compare_critics.py --gradients --chain-lengths 4-6 --sft-epochs=-1 --step-forms 2 --output-dir runs/step-forms-2

Experiments over settings (`--sweep FLAG=V1,V2,...`, `--lengths`). Per seed an SFT model (the demo's:
`vineppo.py --seed S --iterations 0`), then per value of one vineppo.py flag and per method one RL run from it,
with the demo's settings but the same iterations and evaluation for every method (pass@1 on 256 held-out
problems x 4 and on 256 training problems every 2 iterations). A value equal to the demo's is the demo's
setting (<output-dir>/demo/), so sweeps share those runs. Runs go to <output-dir>/<setting>/<critic>-seed<seed>/;
a finished run is skipped, a stopped one resumes from its checkpoint, one made with other settings is refused
(`--report` leaves it out and names it with the settings that differ). Prints and writes (results-<flag>.json,
gains-<flag>.png, curves-<flag>.png), mean ± std over seeds and the first method minus each other paired by seed:
pass@1 before -> after and the gain, the credit's explained variance, the halfway point (iteration and seconds to
half the way from the start to the seed's best final pass@1), tokens; and the paper's claims: the time to PPO's
peak (the first evaluation reaching the best pass@1 of the seed's `value` run: iterations, seconds, tokens),
pass@1 at a KL to the reference every method reached, and the slope of test against train pass@1. The claims
of the README, each one command (settings fixed before their first run):
    python compare_critics.py --sweep temperature=0.6,1.0                  # mc, value, grpo; 3 seeds
    python compare_critics.py --sweep mc-rollouts=1,3,4,9 --critics mc     # the K ablation
    python compare_critics.py --run runs/claims/demo/value-seed0 --alternatives 8 --alternatives-temperature 1.0 \
        --min-alternatives 2 --output-dir runs/claims/value-prediction-seed0    # the critic's ceiling, beside it
`--lengths` is the sweep over the built-in task's chain length (4-6, 8-10, 12-16 operations) with an SFT model
per length (the demo's for 4-6; each longer one continues the previous one's) and 10 iterations, 128 problems:
the paper's lead over PPO is larger on MATH (longer solutions) than on GSM8K, since with more decisions per
response one response-level advantage blames more right steps. The tutor's slip rate per step falls with the
length so that the same share of its solutions ends wrong (`matched_slip_rate`): only the number of decisions
changes. Its default command took 1.6 hours on a 2-core CPU, OMP_NUM_THREADS=2 (3 SFTs 14 min, 27 RL runs 84
min, part of it beside another job); the 12-16 runs are the longest (VinePPO's about 5 min each).

The file reads top to bottom in the order the analyses run:
    Args -> metrics (pure functions) -> states and rollouts -> estimators -> ranking -> report -> main;
    GradientArgs -> cosine, batches (pure functions) -> credit and gradients -> report -> gradients_main;
    ExperimentArgs -> the run plan (a sweep; --lengths) -> runs (skip, resume) -> aggregation -> report ->
    experiment_main.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from tqdm.auto import tqdm

import vineppo


# ============================================================================================
# Arguments
# ============================================================================================
@dataclass
class Args:
    run: str = ""
    """a `vineppo.py --critic value` output directory (uses its final/ and final/value/); empty: train one first"""
    output_dir: str = "runs/compare-critics"
    """where results.json, the figures (and, without --run, the training run in run/) go"""
    overwrite: bool = False
    """allow writing into an output directory that already holds results"""
    problems: int = 24
    """held-out problems whose sampled responses give the states"""
    samples_per_problem: int = 2
    """responses sampled per held-out problem (same sampling settings as the run's training)"""
    k_gt: int = 256
    """rollouts per state of the ground truth V_gt, and of its independent second copy (paper: 256)"""
    mc_k: str = "1,3,9"
    """K of the Monte Carlo estimators; the largest K fresh rollouts per state, the smaller K their first ones"""
    alternatives: int = 5
    """continuations sampled from a state to find alternative next steps (paper: about 5)"""
    alternatives_temperature: float = 0.0
    """temperature of the search for alternative next steps; 0 = the run's (their values always use the run's)"""
    min_alternatives: int = 3
    """a state is ranked only if it has at least this many distinct next steps (paper: 3)"""
    ranking_states: int = 32
    """most states used for the ranking test"""
    position_bins: int = 4
    """bins of relative position in the chain (state index / number of states of its response)"""
    bootstrap: int = 1000
    """bootstrap resamples for every 95% interval"""
    seed: int = 0
    """seed for python and torch (sampling) and the bootstrap"""
    rollout_batch_size: int = 512
    """most sequences in one `generate` call"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda' or 'mps'"""
    ceiling_problems: int = 256
    """the critic's ceiling: training problems whose responses (--samples-per-problem each) give the states it is
    fit on, with a fifth of the problems held out to choose its lr and epochs; 0 = no ceiling row"""
    ceiling_k: int = 16
    """rollouts per state of the ceiling's MC labels"""
    ceiling_lrs: str = "1e-4,3e-4,1e-3,3e-3"
    """learning rates tried for the ceiling (AdamW, minibatches of 64 states)"""
    ceiling_epochs: int = 12
    """most epochs over the labelled states per learning rate; the best epoch on the held-out fifth is kept"""


# With no --run: the demo's SFT model (sft/), then the demo's `vineppo.py --critic value` run from it (run/;
# RL from a saved SFT model repeats the run that trained it), with a smaller evaluation, so that training plus
# this analysis fits in 15 minutes on a 2-core CPU. The SFT model is saved for the critic's ceiling.
SFT_ARGV = ["--iterations", "0"]


def train_argv(sft_dir: str) -> list[str]:
    return (["--model", os.path.join(sft_dir, "final"), "--task", "arith", "--critic", "value"]
            + demo_flags(sft_epochs=0, eval_problems=128))

# With no --run, the ranking test departs from the paper's (5 alternatives, >= 3 distinct) in ONE place:
# after RL the demo policy is nearly deterministic at T=0.6 and an arithmetic step has at most two plausible
# versions (right, or the tutor's slip), so on 100 states only 2 had two distinct next steps and none had
# three. Alternatives are therefore searched at T=1.0 (their values still use the run's T) and pairs count.
DEMO_OVERRIDES = dict(alternatives=8, alternatives_temperature=1.0, min_alternatives=2)

# The paper's figures, DeepSeekMath 7B on MATH, read in secondary summaries of the paper (not the paper).
CEILING = "value net fit to MC"  # the critic's ceiling (`fit_ceiling`)
PAPER = {"value network": "MAE 0.11; ranking near chance", "MC K=9": "MAE 0.03; top-1 70-90%"}


def count_and_mc_k_problems(args, counts: tuple[str, ...]) -> list[str]:
    """The flag checks both analyses share: counts that must be at least 1, and --mc-k."""
    problems = [f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
                for name in counts if getattr(args, name) < 1]
    if not all(k.strip().isdigit() and int(k) > 0 for k in args.mc_k.split(",")):
        problems.append(f"--mc-k must be positive integers separated by commas, like 1,3,9; got {args.mc_k!r}")
    return problems


def chain_length_problems(chain_lengths: str, sft_epochs: str) -> list[str]:
    """The flag checks of the analyses that train per chain length: 'MIN-MAX' lengths, one SFT epochs each."""
    problems = []
    for length in chain_lengths.split(","):
        try:
            vineppo.parse_chain_length(length)
        except ValueError:
            problems.append(f"--chain-lengths takes 'MIN-MAX' or 'N' separated by commas, like 4-6,8-10; got {length!r}")
    try:
        epochs = [float(e) for e in sft_epochs.split(",")]
    except ValueError:
        epochs = []
    if len(epochs) != len(chain_lengths.split(",")):
        problems.append(f"--sft-epochs needs one number per chain length ({chain_lengths}); got {sft_epochs!r}")
    return problems


def parse_args(argv: list[str] | None = None) -> Args:
    parser = vineppo.dataclass_parser(Args, __doc__.split("\n")[0], epilog="python compare_critics.py --gradients "
                                      "runs the gradient-variance analysis instead (see --gradients --help), "
                                      "--lengths the chain-length experiment (--lengths --help)")
    given = vars(parser.parse_args(argv))  # only the flags the user typed
    values = {} if given.get("run") else dict(DEMO_OVERRIDES)  # a flag given on the command line still wins
    values.update(given)
    args = Args(**values)
    problems = count_and_mc_k_problems(args, ("problems", "samples_per_problem", "k_gt", "alternatives",
                                              "ranking_states", "position_bins", "bootstrap", "rollout_batch_size",
                                              "ceiling_k", "ceiling_epochs"))
    if args.ceiling_problems < 0 or args.ceiling_problems == 1:
        problems.append(f"--ceiling-problems must be 0 (no ceiling) or at least 2, got {args.ceiling_problems}")
    try:
        assert all(float(lr) > 0 for lr in args.ceiling_lrs.split(","))
    except (ValueError, AssertionError):
        problems.append(f"--ceiling-lrs must be positive numbers separated by commas; got {args.ceiling_lrs!r}")
    if args.min_alternatives < 2:
        problems.append(f"--min-alternatives must be at least 2 (a ranking needs two steps), got {args.min_alternatives}")
    if args.alternatives_temperature < 0:
        problems.append(f"--alternatives-temperature must be 0 (the run's) or positive, got {args.alternatives_temperature}")
    if args.run and not os.path.isdir(os.path.join(args.run, "final", "value")):
        problems.append(f"--run {args.run} has no final/value/: give the output directory of a finished "
                        f"`vineppo.py --critic value` run")
    if problems:
        sys.exit("error: " + "; ".join(problems))
    return args


def mc_ks(args: Args) -> list[int]:
    return sorted({int(k) for k in args.mc_k.split(",")})


# ============================================================================================
# Metrics: pure functions of predictions and ground truths
# ============================================================================================
def mean_absolute_error(predicted: list[float], truth: list[float]) -> float:
    """mean |prediction - V_gt|; nan for no state."""
    return sum(abs(p - t) for p, t in zip(predicted, truth)) / len(truth) if truth else float("nan")


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; nan when either side is constant (a constant predicts no ORDER at all) or empty.

    >>> pearson([1, 2, 3], [2, 4, 7])
    0.9933992677987828
    """
    n = len(x)
    if n == 0:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 1e-12 and syy > 1e-12 else float("nan")


def within_problem_pearson(groups: list[tuple[list[float], list[float]]]) -> float:
    """Correlation with each problem's difficulty removed: subtract, per problem, the mean prediction and
    the mean V_gt, then correlate the pooled residuals. An estimator that only knows how hard a problem is
    scores 0 here; one that sees which step went wrong scores high.

    An estimator that knows which problem is easy but orders the states of each problem backwards:
    >>> groups = [([0.7, 0.9], [1.0, 0.6]), ([0.1, 0.3], [0.4, 0.0])]
    >>> round(pearson([0.7, 0.9, 0.1, 0.3], [1.0, 0.6, 0.4, 0.0]), 3), within_problem_pearson(groups)
    (0.614, -1.0)
    """
    xs, ys = [], []
    for x, y in groups:
        mx, my = sum(x) / len(x), sum(y) / len(y)
        xs += [a - mx for a in x]
        ys += [b - my for b in y]
    return pearson(xs, ys)


def position_bin(position: float, n_bins: int) -> int:
    """Bin of a relative position in [0, 1): 0 = the prompt state, n_bins - 1 = near the end."""
    return min(int(position * n_bins), n_bins - 1)


def mae_by_position(predicted: list[float], truth: list[float], positions: list[float], n_bins: int) -> list[float]:
    """MAE of the states in each bin of relative position in the chain; nan for an empty bin."""
    errors = [[] for _ in range(n_bins)]
    for p, t, x in zip(predicted, truth, positions):
        errors[position_bin(x, n_bins)].append(abs(p - t))
    return [sum(e) / len(e) if e else float("nan") for e in errors]


def top1_accuracy(groups: list[tuple[list[float], list[float]]]) -> tuple[float, float]:
    """Ranking alternative next steps (paper): per state, does the step the estimator scores highest have
    the highest V_gt? Returns (accuracy, chance), means over states.

    Ties count as a random pick among the tied: the score of a state is the fraction of the estimator's
    top set that is truly best; chance is (#truly best) / (#steps), which is 1/#steps when V_gt has no tie.
    States whose steps all have the same V_gt are left out (any pick is right there).

    >>> top1_accuracy([([0.9, 0.1, 0.2], [1.0, 0.0, 0.5]), ([0.5, 0.5, 0.0], [0.0, 1.0, 0.0])])
    (0.75, 0.3333333333333333)
    """
    scores, chances = [], []
    for predicted, truth in groups:
        if max(truth) == min(truth):
            continue
        best = {i for i, t in enumerate(truth) if t == max(truth)}
        picked = [i for i, p in enumerate(predicted) if p == max(predicted)]
        scores.append(sum(i in best for i in picked) / len(picked))
        chances.append(len(best) / len(truth))
    return (sum(scores) / len(scores), sum(chances) / len(chances)) if scores else (float("nan"), float("nan"))


def pairwise_accuracy(groups: list[tuple[list[float], list[float]]]) -> float:
    """Over all pairs of alternative steps of a state whose V_gt differ: 1 if the estimator orders them
    like V_gt, 1/2 if it ties them (a coin flip), 0 if it reverses them. Chance is exactly 1/2.

    >>> pairwise_accuracy([([0.5, 0.9, 0.5], [1.0, 0.5, 0.0]), ([0.1, 0.9], [0.0, 0.0])])  # reversed, tie, right
    0.5
    """
    scores = []
    for predicted, truth in groups:
        for i in range(len(truth)):
            for j in range(i + 1, len(truth)):
                if truth[i] != truth[j]:
                    agree = (predicted[i] - predicted[j]) * (truth[i] - truth[j])
                    scores.append(1.0 if agree > 0 else 0.5 if agree == 0 else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def bootstrap_ci(statistic, clusters: list, *, n_resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(clusters), resampling whole clusters with replacement
    (a problem's states are not independent of each other). Seeded: the same inputs give the same interval.
    Resamples where the statistic is undefined (nan) are dropped."""
    rng = random.Random(seed)
    values = []
    for _ in range(n_resamples):
        value = statistic([clusters[rng.randrange(len(clusters))] for _ in clusters])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    values.sort()
    lo = values[int((1 - level) / 2 * (len(values) - 1))]
    hi = values[math.ceil((1 + level) / 2 * (len(values) - 1))]
    return lo, hi


# ============================================================================================
# States and rollouts, exactly as vineppo.py builds them
# ============================================================================================
def load_causal_lm(path: str, device):
    from transformers import AutoModelForCausalLM
    fp32 = {vineppo.FROM_PRETRAINED_DTYPE_KWARG: torch.float32}
    return AutoModelForCausalLM.from_pretrained(path, **fp32).to(device).eval()


def load_run(run_dir: str, device):
    """The policy, tokenizer and value network of a `vineppo.py --critic value` run, and its Args."""
    from transformers import AutoTokenizer
    final = os.path.join(run_dir, "final")
    with open(os.path.join(final, "args.json")) as f:
        saved = json.load(f)
    run_args = vineppo.Args(**{f.name: saved[f.name] for f in fields(vineppo.Args) if f.name in saved})
    tokenizer = AutoTokenizer.from_pretrained(final, padding_side="left")
    policy = load_causal_lm(final, device)
    value_model = vineppo.ValueNetwork.load(os.path.join(final, "value")).to(device).eval()
    return policy, tokenizer, value_model, run_args


def response_states(episodes: list[vineppo.Episode]) -> list[dict]:
    """The states of held-out responses as `assign_mc_advantages` builds them: s_i = prompt + the
    response's own first t_i tokens, t_i = step_starts[i] (s_0 = the prompt); all of them, as in the
    official analyzer (training's cap on valued states is a cost saving, not part of the question).
    Identical states (every s_0 of a problem) are kept once, with the position of their first visit:
    i / (number of steps), 0 for the prompt; `is_prompt` marks s_0."""
    states = {}
    for e in episodes:
        for i, state in enumerate(vineppo.episode_states(e)):
            states.setdefault(state, {"state": state, "problem": e.problem_index, "prompt_len": len(e.prompt_ids),
                                      "position": i / len(e.step_starts), "is_prompt": i == 0})
    return list(states.values())


def make_rollout(model, tokenizer, records: list[dict], problems: list[dict], run_args: vineppo.Args, desc: str):
    """rollout(states) -> one reward per state, exactly as `assign_mc_advantages` samples and grades them
    (`vineppo.mc_rollout`: the run's sampling settings, the response's remaining length budget)."""
    origin = {r["state"]: (problems[r["problem"]]["answer"], r["prompt_len"]) for r in records}
    return vineppo.mc_rollout(model, tokenizer, origin, run_args, desc=desc)


# ============================================================================================
# Estimators
# ============================================================================================
def estimate_all(records: list[dict], rollout, args: Args) -> None:
    """Fill each record with V_gt (K_gt rollouts), V_gt2 (K_gt more: the noise ceiling) and 'MC K=k'
    (the first k of max(K) MORE rollouts), all independent samples, drawn in one batched call."""
    k_gt, ks = args.k_gt, mc_ks(args)
    _, rewards = vineppo.mc_values([r["state"] for r in records], 2 * k_gt + ks[-1], rollout)
    for r in records:
        own = rewards[r["state"]]  # [2 K_gt + max K]
        r["truth"] = sum(own[:k_gt]) / k_gt
        r["truth2"] = sum(own[k_gt:2 * k_gt]) / k_gt
        fresh = own[2 * k_gt:]  # never part of the ground truth
        r["pred"] = {f"MC K={k}": sum(fresh[:k]) / k for k in ks}


@torch.inference_mode()
def value_network_predictions(value_model, states: list[tuple[int, ...]], pad_id: int, batch_size: int) -> list[float]:
    """V(s) of the value network: its output at the state's last token, the same position whose value
    PPO trains for the state (`response_values`). States are left-padded with `collate`'s layout and
    position ids, as in training."""
    device = next(value_model.parameters()).device
    values = []
    for start in range(0, len(states), batch_size):
        rows = [list(s) for s in states[start:start + batch_size]]
        batch = vineppo.collate(rows, [[] for _ in rows], pad_id)  # the state as a "prompt" with an empty response
        with vineppo.autocast(device):
            out = value_model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                              batch["position_ids"].to(device))  # [rows, width]
        values += out[:, -1].tolist()
    return values


# The critic's ceiling: what this value network can learn of the policy's values at all, PPO's budget aside.
# The same network (a copy of the run's SFT model + a linear head, as `--critic value` starts), fit by plain
# regression on MC labels of states of training problems (the policy's own responses, as PPO's critic sees
# them), its lr and epochs chosen on held-out problems' states. PPO's critic instead gets a few optimizer steps
# per iteration on single-rollout returns of a policy that keeps moving.
def ceiling_states(policy, tokenizer, run_args: vineppo.Args, args: Args) -> list[dict]:
    """States of responses the policy samples on --ceiling-problems training problems, each labelled with
    the mean reward of --ceiling-k rollouts (`label`)."""
    train, _, _ = vineppo.load_task(run_args)
    indices = random.Random(args.seed + 1).sample(range(len(train)), min(args.ceiling_problems, len(train)))
    records = response_states(vineppo.sample_episodes(policy, tokenizer, train, indices, run_args))
    values, _ = vineppo.mc_values([r["state"] for r in records], args.ceiling_k,
                                  make_rollout(policy, tokenizer, records, train, run_args, "MC labels (the ceiling)"))
    for r in records:
        r["label"] = values[r["state"]]
    return records


def fit_ceiling(sft_model, records: list[dict], pad_id: int, args: Args) -> tuple:
    """Fit ValueNetwork.from_policy(sft_model) to the records' labels (squared error at the state's last
    token, read as `value_network_predictions` reads it), at each of --ceiling-lrs for up to --ceiling-epochs,
    on the states of four fifths of the problems. Returns the network at the lr and epoch (0: as it started)
    best on the other fifth's states, and {lr, epoch, mse: its error there, constant_mse: the error there of
    the fit labels' mean, states: [fit, held out], tried: the best epoch of each lr}."""
    problems = sorted({r["problem"] for r in records})
    held_out = set(random.Random(args.seed).sample(problems, max(1, len(problems) // 5)))
    fit = [r for r in records if r["problem"] not in held_out]
    check = [r for r in records if r["problem"] in held_out]

    def mse(network, rows):
        predicted = value_network_predictions(network, [r["state"] for r in rows], pad_id, args.rollout_batch_size)
        return sum((p - r["label"]) ** 2 for p, r in zip(predicted, rows)) / len(rows)

    best, tried, order = None, [], random.Random(args.seed + 2)
    for lr in [float(x) for x in args.ceiling_lrs.split(",")]:
        network = vineppo.ValueNetwork.from_policy(sft_model).train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0)
        device = next(network.parameters()).device
        mine = {"lr": lr, "epoch": 0, "mse": mse(network.eval(), check), "state": copy.deepcopy(network.state_dict())}
        for epoch in range(1, args.ceiling_epochs + 1):
            network.train()
            order.shuffle(fit)
            for start in range(0, len(fit), 64):
                rows = fit[start:start + 64]
                batch = vineppo.collate([list(r["state"]) for r in rows], [[] for _ in rows], pad_id)
                with vineppo.autocast(device):
                    values = network(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")))
                labels = torch.tensor([r["label"] for r in rows], device=device)
                loss = ((values[:, -1] - labels) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            error = mse(network.eval(), check)
            if error < mine["mse"]:
                mine = {"lr": lr, "epoch": epoch, "mse": error, "state": copy.deepcopy(network.state_dict())}
        tried.append({k: v for k, v in mine.items() if k != "state"})
        if best is None or mine["mse"] < best[1]["mse"]:
            best = (network, mine)
    network, chosen = best
    network.load_state_dict(chosen["state"])
    mean_label = sum(r["label"] for r in fit) / len(fit)
    constant = sum((mean_label - r["label"]) ** 2 for r in check) / len(check)
    return network.eval(), {**{k: v for k, v in chosen.items() if k != "state"}, "constant_mse": constant,
                            "states": [len(fit), len(check)], "tried": tried}


# ============================================================================================
# Ranking alternative next steps
# ============================================================================================
def next_step_state(task: str, decode, state: tuple[int, ...], prompt_len: int, continuation: list[int]):
    """The state after a continuation's FIRST step: the continuation is appended to the response so far,
    the whole response is split into steps on its text and mapped to tokens (`split_response`,
    `step_token_starts`, as in training), and the state ends at the first step start after the old state.
    None if there is none: the step ends the response, and a terminal state's value is its reward, which
    every estimator would know."""
    response = list(state[prompt_len:]) + continuation
    starts = vineppo.step_token_starts(decode, response, vineppo.split_response(task, decode(response)))
    later = [t for t in starts if t > len(state) - prompt_len]
    return tuple(state[:prompt_len]) + tuple(response[:later[0]]) if later else None


def find_alternatives(model, tokenizer, records: list[dict], run_args: vineppo.Args, args: Args) -> list[dict]:
    """From each state (in a seeded random order) sample `alternatives` continuations, keep each one's
    next step, dedupe; keep states with at least `min_alternatives` distinct next states, at most
    `ranking_states` of them. Returns [{parent record, children: [state, ...]}]."""
    decode = functools.partial(vineppo.decode_response, tokenizer)
    order = random.Random(args.seed).sample(records, len(records))
    outputs = vineppo.sample_from_states(model, tokenizer, [r["state"] for r in order for _ in range(args.alternatives)],
                                         [r["prompt_len"] for r in order for _ in range(args.alternatives)], run_args,
                                         temperature=args.alternatives_temperature or None,
                                         desc="alternative next steps")
    kept = []
    for n, r in enumerate(order):
        children = [next_step_state(run_args.task, decode, r["state"], r["prompt_len"], ids)
                    for ids, _ in outputs[n * args.alternatives:(n + 1) * args.alternatives]]
        children = list(dict.fromkeys(c for c in children if c is not None))
        if len(children) >= args.min_alternatives and len(kept) < args.ranking_states:
            kept.append({"parent": r, "children": children})
    return kept


# ============================================================================================
# Report: metrics with intervals, table, results.json, figures
# ============================================================================================
SUBSETS = {"s_0": lambda r: r["is_prompt"], "other states": lambda r: not r["is_prompt"], "all": lambda r: True}


def summarize(records: list[dict], ranked: list[dict], names: list[str], args: Args) -> dict:
    """Every metric of every estimator with its bootstrap 95% interval. Value prediction is reported on
    s_0, on the other states and on all (`SUBSETS`). The bootstrap resamples problems (a problem's states,
    and its ranked states, are not independent of each other), among the problems that have such states."""
    by_problem, ranked_clusters = {}, {}
    for r in records:
        by_problem.setdefault(r["problem"], []).append(r)
    for g in ranked:
        ranked_clusters.setdefault(g["parent"]["problem"], []).append(g)
    ranked_clusters = list(ranked_clusters.values())
    subsets = {subset: [c for c in ([r for r in rs if keep(r)] for rs in by_problem.values()) if c]
               for subset, keep in SUBSETS.items()}  # subset -> [a problem's states in it]
    boot = functools.partial(bootstrap_ci, n_resamples=args.bootstrap, seed=args.seed)
    flat = lambda cs: [r for c in cs for r in c]  # noqa: E731
    out = {}
    for name in tqdm(names, desc="bootstrap", leave=False):
        pred = lambda rs: [r["pred"][name] for r in rs]  # noqa: E731
        truth = lambda rs: [r["truth"] for r in rs]  # noqa: E731
        stats = {
            "mae": lambda cs: mean_absolute_error(pred(flat(cs)), truth(flat(cs))),
            "pearson": lambda cs: pearson(pred(flat(cs)), truth(flat(cs))),
            "within_problem_pearson": lambda cs: within_problem_pearson([(pred(c), truth(c)) for c in cs]),
        }
        row = {}
        for subset, clusters in subsets.items():
            states = flat(clusters)
            row[subset] = {key: {"value": f(clusters), "ci95": boot(f, clusters)} for key, f in stats.items()}
            row[subset]["n_states"] = len(states)
            row[subset]["mae_by_position"] = mae_by_position(pred(states), truth(states),
                                                             [r["position"] for r in states], args.position_bins)
        groups = lambda gs: [([c["pred"][name] for c in g["children"]], [c["truth"] for c in g["children"]])  # noqa: E731
                             for g in gs]
        if ranked:
            ranking = {"top1": lambda cs: top1_accuracy(groups(flat(cs)))[0],
                       "pairwise": lambda cs: pairwise_accuracy(groups(flat(cs)))}
            row.update({key: {"value": f(ranked_clusters), "ci95": boot(f, ranked_clusters)} for key, f in ranking.items()})
        out[name] = row
    if ranked:  # chance: a pick at random among the alternatives (its V_gt ties are counted)
        chance = lambda cs: top1_accuracy([([0.0] * len(g["children"]), [c["truth"] for c in g["children"]])  # noqa: E731
                                           for g in flat(cs)])[1]
        out["chance"] = {"top1": {"value": chance(ranked_clusters), "ci95": boot(chance, ranked_clusters)},
                         "pairwise": {"value": 0.5}}
    return out


def fmt(entry: dict | None) -> str:
    if entry is None or math.isnan(entry["value"]):
        return "n/a"
    lo, hi = entry.get("ci95", (float("nan"),) * 2)
    return f"{entry['value']:.3f} [{lo:.2f}, {hi:.2f}]" if not math.isnan(lo) else f"{entry['value']:.3f}"


def print_table(summary: dict, names: list[str], args: Args, n_problems: int, n_ranked: int) -> None:
    width = 22
    print(f"\nValue prediction on the states of {n_problems} held-out problems (V_gt: K_gt={args.k_gt} rollouts), "
          f"the prompt state s_0 apart. [95% bootstrap interval, problems resampled]")
    header = f"{'estimator':<26} {'states':<18} {'MAE':<{width}} {'Pearson r':<{width}} within-problem r"
    print(header + "\n" + "-" * len(header))
    for name in names:
        for i, subset in enumerate(SUBSETS):
            row = summary[name][subset]
            print(f"{name if i == 0 else '':<26} {subset + ' (' + str(row['n_states']) + ')':<18} "
                  f"{fmt(row['mae']):<{width}} {fmt(row['pearson']):<{width}} {fmt(row['within_problem_pearson'])}")
    edges = [f"{b / args.position_bins:.2f}-{(b + 1) / args.position_bins:.2f}" for b in range(args.position_bins)]
    print(f"\nMAE by relative position in the chain, other states ({' | '.join(edges)}):")
    for name in names:
        print(f"  {name:<26} " + " | ".join("  n/a " if math.isnan(v) else f"{v:.3f}"
                                          for v in summary[name]["other states"]["mae_by_position"]))
    if "chance" in summary:
        print(f"\nRanking alternative next steps on {n_ranked} states with >= {args.min_alternatives} distinct next steps.")
        header = f"{'estimator':<26} {'top-1':<{width}} pairwise"
        print(header + "\n" + "-" * len(header))
        for name in names:
            print(f"{name:<26} {fmt(summary[name]['top1']):<{width}} {fmt(summary[name]['pairwise'])}")
        print(f"{'chance':<26} {fmt(summary['chance']['top1']):<{width}} 0.500")
    print("\nThe paper's figures (DeepSeekMath 7B on MATH, from secondary summaries of the paper, not the paper itself):")
    for name, figures in PAPER.items():
        print(f"  {name:<26} {figures}")


def save_figures(records: list[dict], summary: dict, names: list[str], args: Args) -> list[str]:
    """Three PNGs: predicted vs V_gt (2-D histograms of the other states, s_0 as red crosses), MAE by chain
    position of the other states, ranking accuracy with chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    others, prompts = [r for r in records if not r["is_prompt"]], [r for r in records if r["is_prompt"]]
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pred = [r["pred"][name] for r in records]
        if others:
            ax.hist2d([r["truth"] for r in others], [r["pred"][name] for r in others], bins=20, cmap="viridis", cmin=1,
                      range=[[0, 1], [min(0, min(pred)), max(1, max(pred))]])
        ax.scatter([r["truth"] for r in prompts], [r["pred"][name] for r in prompts], marker="x", color="red", s=14,
                   label="s_0")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        mae = {subset: summary[name][subset]["mae"]["value"] for subset in ("s_0", "other states")}
        ax.set_title(f"{name}\nMAE s_0 {mae['s_0']:.3f}, other states {mae['other states']:.3f}", fontsize=9)
        ax.set_xlabel("V_gt (K_gt rollouts)")
        ax.set_ylabel("predicted")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(os.path.join(args.output_dir, "pred_vs_true.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    centers = [(b + 0.5) / args.position_bins for b in range(args.position_bins)]
    for name in names:
        ax.plot(centers, summary[name]["other states"]["mae_by_position"], marker="o", label=name)
    ax.set_xlabel("relative position in the chain (state index / steps), s_0 left out")
    ax.set_ylabel("MAE against V_gt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(args.output_dir, "mae_by_position.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    if "chance" in summary:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, chance in zip(axes, ("top1", "pairwise"), (summary["chance"]["top1"]["value"], 0.5)):
            values = [summary[n][key]["value"] for n in names]
            lo = [v - summary[n][key]["ci95"][0] for v, n in zip(values, names)]
            hi = [summary[n][key]["ci95"][1] - v for v, n in zip(values, names)]
            ax.bar(range(len(names)), values, yerr=[lo, hi], capsize=3, color="tab:blue")
            ax.axhline(chance, color="red", ls="--", label=f"chance {chance:.2f}")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"{key} accuracy of ranking alternative next steps", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(args.output_dir, "ranking.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


# ============================================================================================
# Main
# ============================================================================================
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gradients" in argv:  # the other analysis: how well each method's minibatch gradient points
        return gradients_main([a for a in argv if a != "--gradients"])
    if "--lengths" in argv or any(a.startswith("--sweep") for a in argv):  # experiments over settings
        return experiment_main([a for a in argv if a != "--lengths"], lengths="--lengths" in argv)
    args = parse_args(argv)
    results_path = os.path.join(args.output_dir, "results.json")
    if os.path.exists(results_path) and not args.overwrite:
        sys.exit(f"error: {args.output_dir} already holds results; pass --overwrite or choose another --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    timings = {}
    if not args.run:  # train the demo's PPO run with a value network first
        args.run = os.path.join(args.output_dir, "run")
        if os.path.isdir(os.path.join(args.run, "final", "value")) and not args.overwrite:
            sys.exit(f"error: {args.run} already holds a trained run: analyse it with --run {args.run}, "
                     f"or pass --overwrite to train a new one")
        sft, overwrite = os.path.join(args.output_dir, "sft"), ["--overwrite"] if args.overwrite else []
        vineppo.main(SFT_ARGV + ["--output-dir", sft] + overwrite)
        vineppo.main(train_argv(sft) + ["--output-dir", args.run] + overwrite)
        timings["train_s"] = time.time() - start
    random.seed(args.seed)  # seeding in one place (after training, which seeds itself)
    torch.manual_seed(args.seed)
    device = vineppo.pick_device(args.device)
    policy, tokenizer, value_model, run_args = load_run(args.run, device)
    run_args = replace(run_args, samples_per_prompt=args.samples_per_problem, rollout_batch_size=args.rollout_batch_size)
    _, _, test = vineppo.load_task(run_args)  # held-out problems: never trained on
    indices = random.Random(args.seed).sample(range(len(test)), min(args.problems, len(test)))

    # 1. states: every step boundary of responses the policy samples on held-out problems
    phase = time.time()
    episodes = vineppo.sample_episodes(policy, tokenizer, test, indices, run_args)
    records = response_states(episodes)
    # 2. ground truth, its independent copy, and fresh MC rollouts, for the states...
    estimate_all(records, make_rollout(policy, tokenizer, records, test, run_args, "V_gt and MC rollouts (states)"), args)
    timings["states_s"] = time.time() - phase
    # 3. ... and for the alternative next steps of the states that have several
    phase = time.time()
    ranked = find_alternatives(policy, tokenizer, records, run_args, args)
    children = [{"state": c, "problem": g["parent"]["problem"], "prompt_len": g["parent"]["prompt_len"]}
                for g in ranked for c in g["children"]]
    children = list({c["state"]: c for c in children}.values())
    if children:
        estimate_all(children, make_rollout(policy, tokenizer, children, test, run_args,
                                            "V_gt and MC rollouts (next steps)"), args)
    by_state = {c["state"]: c for c in children}
    for g in ranked:
        g["children"] = [by_state[c] for c in g["children"]]
    timings["ranking_s"] = time.time() - phase

    # 4. the value network, the constant, the noise ceiling
    everything = records + children
    for r, v in zip(everything, value_network_predictions(value_model, [r["state"] for r in everything],
                                                          tokenizer.pad_token_id, args.rollout_batch_size)):
        r["pred"]["value network"] = v
    ceiling = None  # 5. the critic's ceiling: the same network from the run's SFT model, fit to MC labels
    if args.ceiling_problems and os.path.isdir(run_args.model):
        phase = time.time()
        sft_model = load_causal_lm(run_args.model, device)
        network, ceiling = fit_ceiling(sft_model, ceiling_states(policy, tokenizer, run_args, args),
                                       tokenizer.pad_token_id, args)
        for r, v in zip(everything, value_network_predictions(network, [r["state"] for r in everything],
                                                              tokenizer.pad_token_id, args.rollout_batch_size)):
            r["pred"][CEILING] = v
        timings["ceiling_s"] = time.time() - phase
    elif args.ceiling_problems:
        print(f"no ceiling row: the run's SFT model ({run_args.model}) is not saved; train the run from a saved one "
              f"(vineppo.py --iterations 0, then --model DIR --sft-epochs 0)")
    mean_value = sum(r["truth"] for r in records) / len(records)
    for r in everything:
        r["pred"][f"constant {mean_value:.2f} (mean V_gt)"] = mean_value
        r["pred"]["noise ceiling (2nd V_gt)"] = r["truth2"]
    names = list(records[0]["pred"])

    phase = time.time()
    summary = summarize(records, ranked, names, args)
    timings["bootstrap_s"] = time.time() - phase
    print_table(summary, names, args, len(indices), len(ranked))
    if ceiling:
        print(f"{CEILING}: the same network as the run's critic, from its SFT model, fit to K={args.ceiling_k} MC labels of "
              f"{sum(ceiling['states'])} states of training problems: lr {ceiling['lr']:g}, epoch {ceiling['epoch']} chosen "
              f"on {ceiling['states'][1]} held-out states (MSE {ceiling['mse']:.4f}; their labels' mean: "
              f"{ceiling['constant_mse']:.4f}); tried: " + ", ".join(f"{t['lr']:g} (epoch {t['epoch']}, {t['mse']:.4f})"
                                                                     for t in ceiling["tried"]))
    figures = save_figures(records, summary, names, args)
    timings["total_s"] = time.time() - start
    results = {"args": asdict(args), "run_args": asdict(run_args), "n_states": len(records),
               "n_problems": len(indices), "n_ranking_states": len(ranked), "n_next_steps": len(children),
               "mean_value": mean_value, "metrics": summary, "ceiling": ceiling, "timings": timings, "figures": figures,
               "states": [{key: r[key] for key in ("problem", "position", "is_prompt", "truth", "truth2", "pred")}
                          for r in records],
               "ranking": [{"problem": g["parent"]["problem"], "truth": [c["truth"] for c in g["children"]],
                            "pred": {n: [c["pred"][n] for c in g["children"]] for n in names}} for g in ranked]}
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{len(records)} states, {len(ranked)} ranked | {timings['total_s']:.0f}s | {results_path}, "
          + ", ".join(figures))
    return results


# ############################################################################################
# The gradient-variance analysis: `python compare_critics.py --gradients`
# ############################################################################################
@dataclass
class GradientArgs:
    runs: str = ""
    """comma-separated `vineppo.py --critic value` output directories to analyse; empty: train one per --chain-lengths"""
    chain_lengths: str = "4-6,8-10"
    """without --runs: the built-in task's chain lengths ('MIN-MAX'), one SFT policy and warmed-up critic each"""
    sft_epochs: str = "-1,4"
    """without --runs: SFT epochs per chain length (-1 = the demo's); each after the first continues the previous policy"""
    step_forms: int = 1
    """without --runs: the built-in task's `--step-forms` (harmless choices: each step in one of that many forms)"""
    output_dir: str = "runs/gradient-variance"
    """where results.json, gradients.png (and, without --runs, the training runs run-<chain length>/) go"""
    overwrite: bool = False
    """allow writing into an output directory that already holds results"""
    reference_problems: int = 128
    """training problems of the reference gradient, none of them in the pool"""
    reference_samples: int = 4
    """responses per reference problem"""
    reference_k: int = 16
    """MC rollouts per state of the reference's advantages"""
    pool_problems: int = 64
    """training problems of the pool that batches are drawn from"""
    samples_per_problem: int = 8
    """responses per pool problem: the groups of GRPO and RLOO (paper: 8)"""
    mc_k: str = "1,3,9"
    """K of the Monte Carlo methods; the largest K fresh rollouts per state, the smaller K their first ones"""
    batch_sizes: str = "16,32,64,128"
    """minibatch sizes B, each a multiple of --samples-per-problem (a batch is B / that whole groups)"""
    yardstick_batch: int = 32
    """the report gives the B each method needs to reach the mean cosine of the largest-K MC at this B"""
    batch_responses: int = 512
    """batches per method and B: this many responses / B, at least 8"""
    seed: int = 0
    """seed for python and torch (sampling) and the batches"""
    rollout_batch_size: int = 512
    """most sequences in one `generate` call"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda' or 'mps'"""


TOKENS_PER_OPERATION = 12  # response budget of a trained policy: a line "\n25*2=50" is 8 characters (= tokens)


def parse_gradient_args(argv: list[str]) -> GradientArgs:
    parser = vineppo.dataclass_parser(GradientArgs, "How well does each method's PPO minibatch gradient point?")
    parser.prog = "compare_critics.py --gradients"
    args = GradientArgs(**vars(parser.parse_args(argv)))
    problems = count_and_mc_k_problems(args, ("reference_problems", "reference_samples", "reference_k",
                                              "pool_problems", "samples_per_problem", "batch_responses",
                                              "rollout_batch_size"))
    if args.reference_problems < 2:
        problems.append("--reference-problems must be at least 2 (its two halves measure its noise)")
    sizes = args.batch_sizes.split(",")
    if not all(b.strip().isdigit() and int(b) > 0 and int(b) % args.samples_per_problem == 0 for b in sizes):
        problems.append(f"--batch-sizes must be multiples of --samples-per-problem {args.samples_per_problem} "
                        f"separated by commas, like 16,32,64,128; got {args.batch_sizes!r}")
    else:
        if args.yardstick_batch not in map(int, sizes):
            problems.append(f"--yardstick-batch {args.yardstick_batch} must be one of --batch-sizes {args.batch_sizes}")
        if max(map(int, sizes)) > args.pool_problems * args.samples_per_problem:
            problems.append(f"--batch-sizes {args.batch_sizes}: a batch cannot be larger than the pool of "
                            f"{args.pool_problems * args.samples_per_problem} responses; raise --pool-problems")
    if not args.runs:
        problems += chain_length_problems(args.chain_lengths, args.sft_epochs)
    for run in args.runs.split(",") if args.runs else []:
        if not os.path.isdir(os.path.join(run, "final", "value")):
            problems.append(f"--runs {run} has no final/value/: give output directories of finished "
                            f"`vineppo.py --critic value` runs")
    if problems:
        sys.exit("error: " + "; ".join(problems))
    return args


def batch_sizes(args: GradientArgs) -> list[int]:
    return sorted({int(b) for b in args.batch_sizes.split(",")})


def mean_length(chain_length: str) -> float:
    return sum(vineppo.parse_chain_length(chain_length)) / 2


def training_argv(i: int, args: GradientArgs, previous_run: str = "") -> list[str]:
    """A `--critic value` run with no RL: SFT, then the critic trained alone on the SFT policy's rollouts
    (--critic-warmup), all with the demo's settings (vineppo.TINY_DEMO_OVERRIDES). The first chain length is the
    demo's run from scratch; each later one continues SFT from the previous run's policy (from scratch, the
    tiny model does not learn to track 10 operations in minutes), and its tutor slips less often per step, so
    that a solution holds as many slips on average as on the first chain length. Long chains get a longer
    response budget."""
    lengths, epochs = args.chain_lengths.split(","), args.sft_epochs.split(",")
    budget = max(vineppo.TINY_DEMO_OVERRIDES["max_new_tokens"], TOKENS_PER_OPERATION * vineppo.parse_chain_length(lengths[i])[1])
    slip_rate = vineppo.Args.slip_rate * mean_length(lengths[0]) / mean_length(lengths[i])
    argv = ["--critic", "value", "--iterations", "0", "--chain-length", lengths[i], "--slip-rate", f"{slip_rate:.3g}",
            "--eval-problems", "128", "--seed", str(args.seed)] + (["--step-forms", str(args.step_forms)]
                                                                   if args.step_forms != 1 else [])
    if previous_run:  # not `tiny`: the demo's settings are given as flags, then ours
        argv = ["--model", os.path.join(previous_run, "final"), "--task", "arith"] + demo_flags() + argv
    return argv + ["--max-new-tokens", str(budget)] + (["--sft-epochs", epochs[i]] if float(epochs[i]) >= 0 else [])


# --- pure functions: the cosine, batches, the batch size a method needs ----------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) = a.b / (|a| |b|); 0 when either is zero (a batch whose advantages are all equal, e.g. GRPO
    on groups that all failed, moves nothing: it points nowhere).

    >>> cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    0.7071067811865475
    """
    a, b = a.double(), b.double()
    norms = a.norm() * b.norm()
    return (a @ b / norms).item() if norms > 0 else 0.0


def draw_batches(groups: list[list[int]], batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """n_batches minibatches of batch_size responses, each made of whole groups (all samples of a problem, as
    an iteration samples them: batch_size / group size problems), distinct groups within a batch, drawn anew
    for every batch (batches may share groups with each other)."""
    size = len(groups[0])
    if any(len(g) != size for g in groups) or batch_size % size:
        raise ValueError(f"batch size {batch_size} is not a whole number of groups of {size}")
    if batch_size // size > len(groups):
        raise ValueError(f"batch size {batch_size} needs {batch_size // size} groups; the pool has {len(groups)}")
    rng = random.Random(seed)
    return [[row for group in rng.sample(groups, batch_size // size) for row in group] for _ in range(n_batches)]


def batch_size_needed(sizes: list[int], cosines: list[float], target: float) -> float:
    """The smallest batch size whose mean cosine reaches `target`, linear in log B between the grid points
    around the first crossing; sizes[0] if it is reached there already, inf if never.

    >>> batch_size_needed([16, 32, 64, 128], [0.2, 0.3, 0.5, 0.6], target=0.4)  # halfway from 32 to 64 in log B
    45.254833995939045
    """
    for i, (size, value) in enumerate(zip(sizes, cosines)):
        if value >= target:
            if i == 0:
                return float(size)
            fraction = (target - cosines[i - 1]) / (value - cosines[i - 1])
            return math.exp(math.log(sizes[i - 1]) + fraction * (math.log(size) - math.log(sizes[i - 1])))
    return math.inf


def spread(values: list[float]) -> dict:
    """Mean, standard deviation, standard error of the mean and the middle 95% of the batches' cosines."""
    ordered, n = sorted(values), len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n,
            "range95": (ordered[int(0.025 * (n - 1))], ordered[math.ceil(0.975 * (n - 1))])}


def format_needed(needed: float, sizes: list[int]) -> str:
    return f">{sizes[-1]}" if math.isinf(needed) else f"<={sizes[0]}" if needed == sizes[0] else f"{needed:.0f}"


# --- where the policy is uncertain: entropy on the tokens that decide and on those that do not ------------
# A step's result is where the built-in task's answer is decided (a slip happens there); every other character
# of a response copies the problem or the previous line, or picks one of vineppo's STEP_FORMS.
RESULTS = [re.compile(p) for p in (r"^-?\d+[+\-*]\d+=(-?\d+)$", r"^-?\d+ [+\-*] \d+ = (-?\d+)$",
                                   r"^(-?\d+)=-?\d+[+\-*]\d+$", r"^-?\d+ (?:plus|minus|times) \d+ is (-?\d+)$")]


def result_characters(text: str) -> set[int]:
    """Positions in a built-in-task response of the characters that write a step's result, in any form.

    >>> sorted(result_characters("\\n13-5=8\\n12=3*4\\n#### 12"))
    [6, 8, 9]
    """
    positions, offset = set(), 0
    for line in text.split("\n"):
        match = next((m for m in (pattern.match(line) for pattern in RESULTS) if m), None)
        if match:
            positions.update(range(offset + match.start(1), offset + match.end(1)))
        offset += len(line) + 1
    return positions


@torch.no_grad()
def entropy_by_role(policy, tokenizer, episodes: list, temperature: float) -> dict:
    """The policy's mean entropy (nats) over its responses' tokens, at the sampling temperature, apart for the
    tokens that write a step's result (`result_characters`: a token counts as one if its first character
    is) and for all others: {"result": {"mean", "tokens"}, "other": {...}}."""
    device, sums = next(policy.parameters()).device, {"result": [0.0, 0], "other": [0.0, 0]}
    for start in range(0, len(episodes), 64):
        chunk = episodes[start:start + 64]
        batch = collated(chunk, tokenizer)
        width = batch["response_mask"].shape[1]
        logits = policy(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        position_ids=batch["position_ids"].to(device)).logits[:, -width - 1:-1].float() / temperature
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [B, width], right-aligned
        for row, e in enumerate(chunk):
            decided = result_characters(tokenizer.decode(e.response_ids))
            for j in range(len(e.response_ids)):
                first = len(tokenizer.decode(e.response_ids[:j]))  # where token j's text starts
                role = sums["result" if first in decided else "other"]
                role[0] += entropy[row, width - len(e.response_ids) + j].item()
                role[1] += 1
    return {role: {"mean": total / n if n else math.nan, "tokens": n} for role, (total, n) in sums.items()}


# --- credit and gradients, exactly as vineppo.py forms them -------------------------------------
def mc_rollout_rewards(policy, tokenizer, episodes: list, problems: list[dict], run_args, k: int, desc: str) -> dict:
    """{state: [k rewards]}: k fresh rollouts from each of the first `state_cap` states of every response,
    identical states once, all in one batched call: the rollouts of `assign_mc_advantages`."""
    cap = vineppo.state_cap(run_args)
    origin = {s: (problems[e.problem_index]["answer"], len(e.prompt_ids)) for e in episodes
              for s in vineppo.episode_states(e, cap)}
    return vineppo.mc_values(list(origin), k, vineppo.mc_rollout(policy, tokenizer, origin, run_args, desc=desc))[1]


def mc_token_advantages(episodes: list, rewards: dict, k: int, cap: int | None,
                        return_minus_value: bool = False) -> list[list[float]]:
    """Each response's token advantages from the first k rollouts of its states, as `assign_mc_advantages`
    forms them: V(s_i) = their mean, step advantages (past the cap V = R), each token takes its step's.
    return_minus_value: the critic's form instead, GAE with lambda = 1, A = R - V(s_i) for every token of
    step i (past the cap 0): what a critic that is exact at step starts would give."""
    out = []
    for e in episodes:
        values = [sum(rewards[s][:k]) / k for s in vineppo.episode_states(e, cap)]
        steps = ([e.reward - v for v in values] + [0.0] * (len(e.step_starts) - len(values)) if return_minus_value
                 else vineppo.step_advantages(values, e.reward, n_steps=len(e.step_starts)))
        out.append(vineppo.token_advantages(steps, e.step_starts, len(e.response_ids)))
    return out


def policy_gradient(policy, batch: dict, fixed: dict, advantages: torch.Tensor, rows: list[int], run_args,
                    device) -> torch.Tensor:
    """The update direction of one PPO minibatch, formed exactly as `ppo_update` forms it, at ratio 1 (the
    first minibatch of an update: fixed['logp_old'] = fixed['logp_ref'] = the policy's own log-probs):
    `minibatch_backward` whitens the advantages over the minibatch and averages over its tokens, so this is
    sum_t whitened(A)_t grad log pi_t / n_tokens; the KL term's gradient is 0 where pi = pi_ref, and the norm
    clip would only rescale it (no cosine sees a scale). Returns minus the loss gradient, flat [n_params]."""
    vineppo.minibatch_backward(policy, None, batch, fixed, advantages, None, torch.tensor(rows), run_args, device)
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in policy.parameters()])
    policy.zero_grad(set_to_none=True)
    return -grad.cpu()


def collated(episodes: list, tokenizer) -> dict:
    return vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], tokenizer.pad_token_id)


def sample_reference_and_pool(policy, tokenizer, problems: list[dict], run_args, args: GradientArgs):
    """Two independent sets of responses from the policy, on disjoint problems, each with its own MC
    rollouts: the reference (reference_samples per problem, reference_k rollouts per state) and the pool
    (samples_per_problem per problem, max(mc_k) rollouts per state). Returns ((episodes, rollout
    rewards), (episodes, rollout rewards))."""
    if args.reference_problems + args.pool_problems > len(problems):
        sys.exit(f"error: {args.reference_problems} reference + {args.pool_problems} pool problems are more than "
                 f"the {len(problems)} training problems; ask for fewer")
    chosen = random.Random(args.seed).sample(range(len(problems)), args.reference_problems + args.pool_problems)
    sets = []
    for indices, samples, k, name in [(chosen[:args.reference_problems], args.reference_samples, args.reference_k,
                                       "reference"), (chosen[args.reference_problems:], args.samples_per_problem,
                                                      mc_ks(args)[-1], "pool")]:
        episodes = vineppo.sample_episodes(policy, tokenizer, problems, indices,
                                           replace(run_args, samples_per_prompt=samples))
        sets.append((episodes, mc_rollout_rewards(policy, tokenizer, episodes, problems, run_args, k,
                                                  f"MC rollouts ({name})")))
    return sets


def analyse_policy(run_dir: str, args: GradientArgs, device) -> dict:
    """The reference gradient, the pool's advantages by every method, and the cosine of every batch
    gradient to the reference, for the policy and critic of one run."""
    policy, tokenizer, value_model, run_args = load_run(run_dir, device)
    run_args = replace(run_args, rollout_batch_size=args.rollout_batch_size)
    train, _, _ = vineppo.load_task(run_args)  # RL samples training problems
    cap, timings, phase = vineppo.state_cap(run_args), {}, time.time()
    (reference, reference_rewards), (pool, pool_rewards) = sample_reference_and_pool(policy, tokenizer, train,
                                                                                     run_args, args)
    true_rewards = mc_rollout_rewards(policy, tokenizer, pool, train, run_args, args.reference_k,
                                      "MC rollouts (pool, true credit)")  # fresh: shared with no method
    timings["sampling_s"] = time.time() - phase

    # 1. the reference: its own gradient, and the cosine between its halves (disjoint problems) as its noise
    phase = time.time()
    batch = collated(reference, tokenizer)
    fixed = vineppo.precompute(policy, policy, None, batch, run_args, device)  # pi_old = pi_ref = pi: ratio 1
    advantages = vineppo.right_aligned(mc_token_advantages(reference, reference_rewards, args.reference_k, cap),
                                       batch["response_mask"].shape[1])
    half = args.reference_problems // 2 * args.reference_samples
    rows = list(range(len(reference)))
    reference_gradient, first, second = (policy_gradient(policy, batch, fixed, advantages, r, run_args, device)
                                         for r in (rows, rows[:half], rows[half:]))
    halves = cosine(first, second)

    # 2. the pool's advantages: MC with K = 1, 3, 9, and the toggle itself for the critic, GRPO and RLOO
    batch = collated(pool, tokenizer)
    fixed = vineppo.precompute(policy, policy, value_model, batch, run_args, device)
    width = batch["response_mask"].shape[1]
    methods = {f"MC K={k}": vineppo.right_aligned(mc_token_advantages(pool, pool_rewards, k, cap), width)
               for k in mc_ks(args)}
    credit_stats = {}
    for critic, name in (("value", "value network"), ("grpo", "GRPO"), ("rloo", "RLOO")):
        methods[name], _, credit_stats[name] = vineppo.assign_credit(pool, batch, fixed, policy, tokenizer, train,
                                                                     replace(run_args, critic=critic))
        if critic == "value":  # the control: the critic's form, with MC K=max's values in place of the network's
            methods[f"R - V(MC K={mc_ks(args)[-1]})"] = vineppo.right_aligned(
                mc_token_advantages(pool, pool_rewards, mc_ks(args)[-1], cap, return_minus_value=True), width)
    true_credit = vineppo.right_aligned(mc_token_advantages(pool, true_rewards, args.reference_k, cap), width)
    timings["reference_and_credit_s"] = time.time() - phase

    # 3. batches of whole groups, the same batches for every method; and the whole pool as one batch
    phase = time.time()
    whole_pool = {name: cosine(policy_gradient(policy, batch, fixed, adv, list(range(len(pool))), run_args, device),
                               reference_gradient) for name, adv in methods.items()}
    groups = [list(range(g * args.samples_per_problem, (g + 1) * args.samples_per_problem))
              for g in range(args.pool_problems)]
    cosines, same_batch = {name: {} for name in methods}, {name: {} for name in methods}
    truth_zero = {}  # batches whose true-credit gradient is 0 (every response right, every V = 1): no direction
    for size in batch_sizes(args):
        draws = draw_batches(groups, size, max(8, args.batch_responses // size), seed=args.seed + size)
        truth_zero[size] = 0
        for rows in tqdm(draws, desc=f"batch gradients, B={size}", leave=False):
            truth = policy_gradient(policy, batch, fixed, true_credit, rows, run_args, device)  # same responses
            has_direction = bool(truth.norm() > 0)
            truth_zero[size] += not has_direction
            for name, adv in methods.items():
                g = policy_gradient(policy, batch, fixed, adv, rows, run_args, device)
                cosines[name].setdefault(size, []).append(cosine(g, reference_gradient))
                if has_direction:
                    same_batch[name].setdefault(size, []).append(cosine(g, truth))
    timings["batch_gradients_s"] = time.time() - phase

    summary = {name: {size: spread(values) for size, values in by_size.items()} for name, by_size in cosines.items()}
    yardstick = f"MC K={mc_ks(args)[-1]}"  # VinePPO with the paper's K = 9 by default
    target = summary[yardstick][args.yardstick_batch]["mean"]
    needed = {name: batch_size_needed(batch_sizes(args), [summary[name][b]["mean"] for b in batch_sizes(args)], target)
              for name in methods}
    paired = {name: {size: spread([a - b for a, b in zip(by_size[size], cosines[yardstick][size])]) for size in by_size}
              for name, by_size in cosines.items()}  # the same batches: the difference to the yardstick is much less noisy
    entropy = entropy_by_role(policy, tokenizer, pool, run_args.temperature) if run_args.task == "arith" else None
    return {"run": run_dir, "chain_length": run_args.chain_length, "task": run_args.task, "entropy": entropy,
            "step_forms": run_args.step_forms,
            "pool": {"responses": len(pool), "mean_reward": sum(e.reward for e in pool) / len(pool),
                     "mean_tokens": sum(len(e.response_ids) for e in pool) / len(pool),
                     "mean_steps": sum(len(e.step_starts) for e in pool) / len(pool),
                     "states": len(pool_rewards), "critic_explained_variance":
                     credit_stats["value network"]["value/explained_variance"]},
            "reference": {"responses": len(reference), "k": args.reference_k, "states": len(reference_rewards),
                          "mean_reward": sum(e.reward for e in reference) / len(reference), "halves_cosine": halves,
                          "cosine_to_true_gradient": math.sqrt(2 * halves / (1 + halves)) if halves > 0 else math.nan},
            "target": {"method": yardstick, "batch_size": args.yardstick_batch, "cosine": target},
            "summary": summary, "batch_size_needed": {n: None if math.isinf(v) else v for n, v in needed.items()},
            "paired_difference": paired, "whole_pool": whole_pool,
            "same_batch": {name: {size: spread(values) for size, values in by_size.items()}
                           for name, by_size in same_batch.items()}, "same_batch_skipped": truth_zero,
            "cosines": cosines, "same_batch_cosines": same_batch, "timings": timings}


# --- report and the command -------------------------------------------------------------------
def print_gradient_table(result: dict, args: GradientArgs) -> None:
    sizes, ref, pool = batch_sizes(args), result["reference"], result["pool"]
    print(f"\nChain length {result['chain_length']} ({result['run']}): pool of {pool['responses']} responses "
          f"({args.pool_problems} problems x {args.samples_per_problem}), mean reward {pool['mean_reward']:.3f}, "
          f"{pool['mean_steps']:.1f} steps; critic explained variance {pool['critic_explained_variance']:.3f}")
    quality = (f"so about {ref['cosine_to_true_gradient']:.2f} to the true gradient (every cosine below is shrunk by "
               f"that factor)" if ref["halves_cosine"] > 0 else "so it is mostly noise: read nothing below")
    if result.get("entropy"):
        print(f"Policy entropy per token, sampling temperature (step forms: {result['step_forms']}): "
              + ", ".join(f"{role} {e['mean']:.3f} nats ({e['tokens']} tokens)" for role, e in result["entropy"].items())
              + " (result: the tokens that write a step's result, where the answer is decided)")
    print(f"Reference: {ref['responses']} other responses, MC K={ref['k']}; cosine between its halves "
          f"{ref['halves_cosine']:.3f}, {quality}")
    first, target = result["summary"][next(iter(result["summary"]))], result["target"]
    header = (f"{'method':<15}" + "".join(f"B={b} ({first[b]['n']})".ljust(17) for b in sizes)
              + f"{'all ' + str(pool['responses']):<9}B needed")
    print(f"cosine of one minibatch gradient to the reference, mean +- std over (n) batches; all: the whole pool as one "
          f"batch; B needed: to reach {target['method']}'s mean at B={target['batch_size']} ({target['cosine']:.3f})"
          f"\n{header}\n" + "-" * len(header))
    for name, by_size in result["summary"].items():
        needed = result["batch_size_needed"][name]
        print(f"{name:<15}" + "".join(f"{by_size[b]['mean']:6.3f} +- {by_size[b]['std']:.3f}  " for b in sizes)
              + f"{result['whole_pool'][name]:6.3f}   " + format_needed(math.inf if needed is None else needed, sizes))
    skipped = result["same_batch_skipped"]
    for key, title, spread_key in (
            ("paired_difference", f"the same batches, minus {target['method']}'s cosine to the reference, mean +- its "
                                  f"standard error (batches share the pool's groups, so it understates the noise)", "se"),
            ("same_batch", f"the same batches, cosine to the gradient those very responses give with MC K={ref['k']} "
                           f"step credit (fresh rollouts), mean +- std: how far each credit is from the least noisy one; "
                           f"batches whose gradient there is 0 left out ({', '.join(f'B={b}: {skipped[b]}' for b in sizes)})",
             "std")):
        print(f"\n{title}\n{'method':<15}" + "".join(f"B={b}".ljust(17) for b in sizes))
        for name, by_size in result[key].items():
            print(f"{name:<15}" + "".join(f"{by_size[b]['mean']:+6.3f} +- {by_size[b][spread_key]:.3f}  "
                                          if b in by_size else "(none)".ljust(17) for b in sizes))


def save_gradient_figure(results: list[dict], args: GradientArgs) -> str:
    """Mean cosine (+- its standard error) against B on a log axis, a column per chain length: to the
    reference (top), and to the same batch's gradient with K = reference_k credit (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = batch_sizes(args)
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    for column, result in enumerate(results):
        for ax, key, label in ((axes[0, column], "summary", "cosine to the reference gradient"),
                               (axes[1, column], "same_batch", f"cosine to the same batch, K={args.reference_k} credit")):
            for name, by_size in result[key].items():
                present = [b for b in sizes if b in by_size]  # a B whose batches all have no true-credit direction: none
                ax.errorbar(present, [by_size[b]["mean"] for b in present], yerr=[by_size[b]["se"] for b in present],
                            marker="o", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.set_xlabel("minibatch size B (responses)")
            ax.set_ylabel(f"{label} (mean +- s.e.)", fontsize=9)
            ax.set_title(f"chain length {result['chain_length']}", fontsize=10)
            ax.legend(fontsize=8)
        axes[0, column].axhline(result["target"]["cosine"], color="gray", ls="--", lw=0.8)
    fig.tight_layout()
    path = os.path.join(args.output_dir, "gradients.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def gradients_main(argv: list[str]) -> dict:
    args = parse_gradient_args(argv)
    results_path = os.path.join(args.output_dir, "results.json")
    if os.path.exists(results_path) and not args.overwrite:
        sys.exit(f"error: {args.output_dir} already holds results; pass --overwrite or choose another --output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    start, timings = time.time(), {}
    runs = args.runs.split(",") if args.runs else []
    for i, length in enumerate(args.chain_lengths.split(",") if not runs else []):  # a policy and critic each
        runs.append(os.path.join(args.output_dir, f"run-{length}"))
        if os.path.isdir(os.path.join(runs[-1], "final", "value")) and not args.overwrite:
            sys.exit(f"error: {runs[-1]} already holds a trained run: analyse it with --runs, or pass --overwrite")
        vineppo.main(training_argv(i, args, runs[-2] if i else "") + ["--output-dir", runs[-1], "--overwrite"])
        timings[f"train_{length}_s"] = time.time() - start - sum(timings.values())
    device = vineppo.pick_device(args.device)
    results = []
    for run in runs:
        random.seed(args.seed)  # seeding in one place (after training, which seeds itself)
        torch.manual_seed(args.seed)
        results.append(analyse_policy(run, args, device))
        print_gradient_table(results[-1], args)
    timings["total_s"] = time.time() - start
    try:
        figure = save_gradient_figure(results, args)
    except ImportError:
        figure = None
        print("matplotlib is not installed: no gradients.png (pip install matplotlib)")
    out = {"args": asdict(args), "results": results, "timings": timings, "figure": figure}
    with open(results_path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{timings['total_s']:.0f}s | {results_path}" + (f", {figure}" if figure else ""))
    return out


# ############################################################################################
# Experiments over settings: `python compare_critics.py --sweep FLAG=V1,V2` and `--lengths`
# ############################################################################################
@dataclass
class ExperimentArgs:
    """An experiment over settings of vineppo.py: one RL run per setting, seed and method"""
    sweep: str = ""
    """a vineppo.py flag and its values, FLAG=V1,V2,..., like temperature=0.6,1.0 or mc-rollouts=1,3,9: one
    setting per value; a value equal to the demo's is the demo's setting (<output-dir>/demo/, shared by sweeps)"""
    seeds: str = "0,1,2"
    """seeds: each seed's SFT model is the demo's (`vineppo.py --seed S --iterations 0`; with --lengths, seed
    0's only), and every (setting, seed, method) is one run from it"""
    critics: str = "mc,value,grpo"
    """the methods compared (`vineppo.py --critic`); the first is the one the others are subtracted from"""
    iterations: int = 14
    """RL iterations of every run (the demo's 14; --lengths: 10)"""
    eval_every: int = 2
    """evaluate (and checkpoint) every this many iterations: the curves that the tables are read from"""
    eval_problems: int = 256
    """held-out problems per evaluation of the RL runs, x --eval-samples 4, the demo's (--lengths: 128)"""
    eval_train_problems: int = 256
    """training problems evaluated beside them (vineppo.py's flag): test against train pass@1 (--lengths: 0)"""
    output_dir: str = "runs/claims"
    """where the SFT runs sft-seed<seed>/, the RL runs <setting>/<critic>-seed<seed>/, results-<flag>.json and
    the figures go (--lengths: runs/chain-lengths: sft-<length>/, <length>/<critic>-seed<seed>/, results.json)"""
    report: bool = False
    """train nothing: print the tables and draw the figures from the runs finished so far with these settings"""
    chain_lengths: str = "4-6,8-10,12-16"
    """--lengths only: the built-in task's chain lengths ('MIN-MAX'), shortest first"""
    sft_epochs: str = "-1,4,4"
    """--lengths only: SFT epochs per chain length (-1: the demo's, from scratch; type --sft-epochs=-1,...);
    each later one continues the previous length's SFT model"""


# `--lengths` is the sweep over chain lengths with an SFT model per length (`length_plan`) and these defaults.
LENGTHS = dict(iterations=10, eval_problems=128, eval_train_problems=0, output_dir="runs/chain-lengths")
NOT_SWEPT = ("critic", "seed", "output_dir", "model", "task", "resume", "overwrite", "device", "dataset_path")
TASK_FLAGS = ("chain_length", "slip_kinds", "slip_rate", "step_forms", "train_problems", "test_problems")  # SFT and RL see them
SFT_FLAGS = ("sft_epochs", "sft_lr", "sft_batch_size")  # the SFT model's alone


def parse_experiment_args(argv: list[str], lengths: bool) -> ExperimentArgs:
    mode = "--lengths" if lengths else "--sweep"
    parser = vineppo.dataclass_parser(ExperimentArgs, "Does VinePPO's lead over PPO and GRPO grow with chain length?"
                                      if lengths else "VinePPO, PPO and GRPO over the values of one vineppo.py flag")
    parser.prog = f"compare_critics.py {mode}"
    given = vars(parser.parse_args(argv))
    args = ExperimentArgs(**{**(LENGTHS if lengths else {}), **given})
    problems = [f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
                for name in ("iterations", "eval_every", "eval_problems") if getattr(args, name) < 1]
    if args.eval_train_problems < 0:
        problems.append(f"--eval-train-problems cannot be negative, got {args.eval_train_problems}")
    if lengths:
        problems += chain_length_problems(args.chain_lengths, args.sft_epochs)
        if any(e.strip().startswith("-") for e in args.sft_epochs.split(",")[1:]):
            problems.append(f"--sft-epochs: only the first chain length may take -1 (the demo's); got {args.sft_epochs!r}")
        if args.sweep:
            problems.append("--lengths sweeps the chain length: give --chain-lengths, not --sweep")
    else:
        problems += [f"--{name.replace('_', '-')} belongs to --lengths" for name in ("chain_lengths", "sft_epochs")
                     if name in given]
        problems += sweep_problems(args.sweep)
    if not all(s.strip().isdigit() for s in args.seeds.split(",")):
        problems.append(f"--seeds must be integers separated by commas, like 0,1,2; got {args.seeds!r}")
    if not set(args.critics.split(",")) <= {"mc", "value", "grpo", "rloo"}:
        problems.append(f"--critics takes mc, value, grpo, rloo separated by commas; got {args.critics!r}")
    if problems:
        sys.exit("error: " + "; ".join(problems))
    return args


def sweep_problems(sweep: str) -> list[str]:
    """The checks of --sweep FLAG=V1,V2: a vineppo.py flag with a value, not one the experiment sets, values of
    its type, each once."""
    name, _, values = sweep.partition("=")
    name = name.strip().removeprefix("--").replace("-", "_")
    kinds = {f.name: f.type for f in fields(vineppo.Args)}
    if not sweep:
        return ["--sweep is required: a vineppo.py flag and its values, like --sweep temperature=0.6,1.0"]
    if not values or kinds.get(name) not in ("int", "float", "str"):
        return [f"--sweep takes FLAG=V1,V2,... with a vineppo.py flag that takes a value, like temperature=0.6,1.0; "
                f"got {sweep!r}"]
    if name in NOT_SWEPT:
        return [f"--sweep cannot vary --{name.replace('_', '-')}: the experiment sets it ({', '.join(NOT_SWEPT)})"]
    try:
        parsed = [{"int": int, "float": float, "str": str}[kinds[name]](v) for v in values.split(",")]
    except ValueError:
        return [f"--sweep {name.replace('_', '-')} takes {kinds[name]} values; got {values!r}"]
    return [] if len(set(parsed)) == len(parsed) else [f"--sweep: a value is repeated in {values!r}"]


def sweep_settings(args: ExperimentArgs) -> list[dict]:
    """Per value of the swept flag: its label (and directory), `demo` where the value is the demo's (so sweeps
    share those runs), and the vineppo.py flags that set it."""
    name, _, values = args.sweep.partition("=")
    name = name.strip().removeprefix("--").replace("-", "_")
    demo = vineppo.parse_args(["--iterations", "0"])
    settings = []
    for value in values.split(","):
        typed = type(getattr(demo, name))(value)
        label = "demo" if typed == getattr(demo, name) else f"{name.replace('_', '-')}={typed}"
        settings.append({"label": label, "flag": name, "value": typed,
                         "flags": [] if label == "demo" else [f"--{name.replace('_', '-')}", str(typed)]})
    return settings


def demo_flags(**changes) -> list[str]:
    """TINY_DEMO_OVERRIDES as flags (a model directory is not `tiny`, so they must be typed), with changes."""
    return [flag for name, value in {**vineppo.TINY_DEMO_OVERRIDES, **changes}.items()
            for flag in (f"--{name.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value))]


def rl_argv(sft_run: str, critic: str, seed: str, setting_flags: list[str], run_dir: str, args: ExperimentArgs) -> list[str]:
    """One RL run from an SFT model: the demo's settings but for the iterations and the evaluation, which are the
    same for every method, and the setting's flags."""
    evaluation = dict(eval_every=args.eval_every, eval_problems=args.eval_problems, save_every=args.eval_every)
    if args.eval_train_problems:
        evaluation["eval_train_problems"] = args.eval_train_problems
    return (["--model", os.path.join(sft_run, "final"), "--task", "arith", "--critic", critic]
            + demo_flags(sft_epochs=0, iterations=args.iterations, **evaluation)
            + setting_flags + ["--seed", seed, "--output-dir", run_dir])


def sweep_plan(args: ExperimentArgs) -> tuple[list[dict], list[dict]]:
    """The SFT runs, then the RL runs, in the order they train: {label, argv, dir} and {setting, critic, seed,
    argv, dir}. Each seed's SFT model is the demo's (`vineppo.py --seed S --iterations 0`), or, where the swept
    flag is the task's or SFT's, the demo's with the setting's value (its own directory)."""
    sfts, runs, sft_of = [], [], {}
    for seed in args.seeds.split(","):
        for setting in sweep_settings(args):
            shared = setting["label"] == "demo" or setting["flag"] not in TASK_FLAGS + SFT_FLAGS
            sft = os.path.join(args.output_dir, *([] if shared else [setting["label"]]), f"sft-seed{seed}")
            if sft not in [s["dir"] for s in sfts]:
                sfts.append({"label": f"seed{seed}" if shared else f"{setting['label']} seed{seed}", "dir": sft,
                             "argv": ["--seed", seed, "--iterations", "0", "--output-dir", sft]
                             + ([] if shared else setting["flags"])})
            sft_of[setting["label"], seed] = sft
    for seed in args.seeds.split(","):  # seed by seed: a stop leaves every setting with results
        for setting in sweep_settings(args):
            task = setting["flags"] if setting["flag"] not in SFT_FLAGS else []
            for critic in args.critics.split(","):
                run_dir = os.path.join(args.output_dir, setting["label"], f"{critic}-seed{seed}")
                runs.append({"setting": setting["label"], "critic": critic, "seed": seed, "dir": run_dir,
                             "argv": rl_argv(sft_of[setting["label"], seed], critic, seed, task, run_dir, args)})
    return sfts, runs


# --- --lengths: an SFT model per chain length, its tutor's slip rate matched -------------------
# Held fixed across chain lengths: the share of the tutor's training solutions that end wrong, the demo's
# (slip rate 0.3 per slip-prone step on 4-6 operations). A longer chain has more slip-prone steps, so its
# tutor slips less often per step (`matched_slip_rate`): only the number of decisions changes.
MATCHED_SHARE_OF = ("4-6", vineppo.Args.slip_rate)


def wrong_share(problems: list[dict]) -> float:
    """The share of training solutions whose final answer, read as the grader reads it, is not the true one."""
    return sum(vineppo.extract_gsm8k_answer(p["solution"]) != p["answer"] for p in problems) / len(problems)


@functools.lru_cache
def matched_slip_rate(chain_length: str, share: float, *, seed: int = 0, n: int = 4000, tolerance: float = 1e-4) -> float:
    """The tutor's slip rate per slip-prone step at which `share` of the chain length's training solutions
    (the task's own generator, `n` problems) end wrong: bisection, as the share grows with the rate.
    Deterministic, so cached: every rerun of the experiment asks again."""
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if wrong_share(vineppo.make_arith_task(seed, n, 0, middle, chain_length)[0]) < share \
            else (low, middle)
    return round((low + high) / 2, 3)


def length_settings(args: ExperimentArgs) -> list[dict]:
    """Per chain length: the tutor's slip rate (`matched_slip_rate`), the response budget (12 tokens an
    operation, at least the demo's 80) and the SFT epochs."""
    target = wrong_share(vineppo.make_arith_task(0, 4000, 0, MATCHED_SHARE_OF[1], MATCHED_SHARE_OF[0])[0])
    return [{"chain_length": length, "slip_rate": matched_slip_rate(length, target) if length != MATCHED_SHARE_OF[0]
             else MATCHED_SHARE_OF[1],
             "max_new_tokens": max(vineppo.TINY_DEMO_OVERRIDES["max_new_tokens"],
                                   TOKENS_PER_OPERATION * vineppo.parse_chain_length(length)[1]),
             "sft_epochs": float(epochs)}
            for length, epochs in zip(args.chain_lengths.split(","), args.sft_epochs.split(","))]


def length_plan(args: ExperimentArgs) -> tuple[list[dict], list[dict]]:
    """As `sweep_plan`, over chain lengths: one SFT model per length (the first seed's), from scratch on the
    first (-1: the demo's epochs), each later one continuing the previous length's for its epochs; evaluated
    as the demo (256 problems x 4). Every RL run of a length starts from its SFT model."""
    sfts, runs = [], []
    for i, task in enumerate(length_settings(args)):
        flags = ["--chain-length", task["chain_length"], "--slip-rate", f"{task['slip_rate']:g}"]
        sft = os.path.join(args.output_dir, f"sft-{task['chain_length']}")
        if i == 0:  # `tiny`: the demo's settings apply by themselves
            epochs = ["--sft-epochs", f"{task['sft_epochs']:g}"] if task["sft_epochs"] >= 0 else []
            argv = ["--iterations", "0", "--max-new-tokens", str(task["max_new_tokens"])] + epochs
        else:
            argv = (["--model", os.path.join(sfts[-1]["dir"], "final"), "--task", "arith"]
                    + demo_flags(iterations=0, sft_epochs=task["sft_epochs"], max_new_tokens=task["max_new_tokens"]))
        sfts.append({"label": task["chain_length"], "dir": sft,
                     "argv": argv + flags + ["--seed", args.seeds.split(",")[0], "--output-dir", sft]})
    for seed in args.seeds.split(","):
        for task, sft in zip(length_settings(args), sfts):
            for critic in args.critics.split(","):
                run_dir = os.path.join(args.output_dir, task["chain_length"], f"{critic}-seed{seed}")
                flags = ["--max-new-tokens", str(task["max_new_tokens"]), "--chain-length", task["chain_length"],
                         "--slip-rate", f"{task['slip_rate']:g}"]
                runs.append({"setting": task["chain_length"], "critic": critic, "seed": seed, "dir": run_dir,
                             "argv": rl_argv(sft["dir"], critic, seed, flags, run_dir, args)})
    return sfts, runs


# --- runs: skip the finished, resume the stopped, refuse other settings --------------------------
COMPARED_AWAY = ("output_dir", "overwrite", "resume", "device")  # may differ without changing a run


def changed_settings(argv: list[str], output_dir: str) -> list[str] | None:
    """None if output_dir holds no finished run (no final/args.json); else the settings its run was made with
    that differ from those argv gives: [] for the run argv asks for. Training refuses a run made with other
    settings (`run_state`), the report leaves it out (`finished_runs`)."""
    settings_path = os.path.join(output_dir, "final", "args.json")
    if not os.path.isfile(settings_path):
        return None
    with open(settings_path) as f:
        saved = json.load(f)
    planned = asdict(vineppo.parse_args(argv))
    defaults = asdict(vineppo.Args())  # a run made before a flag existed ran with its default
    return sorted(k for k in planned if k not in COMPARED_AWAY and saved.get(k, defaults[k]) != planned[k])


def run_state(argv: list[str], output_dir: str) -> str:
    """'done' (final/ holds the settings argv gives), 'resume' (a checkpoint of a run stopped on the way)
    or 'new'. A finished run made with other settings is refused: the experiment's settings are fixed."""
    changed = changed_settings(argv, output_dir)
    if changed:
        sys.exit(f"error: {output_dir} was run with other settings ({', '.join(changed)}); "
                 f"choose another --output-dir for these")
    if changed == []:
        return "done"
    return "resume" if os.path.isfile(os.path.join(output_dir, "checkpoint.pt")) else "new"


def train(argv: list[str], output_dir: str) -> None:
    """Run `vineppo.py argv` unless it is finished; a stopped run continues from its checkpoint."""
    state = run_state(argv, output_dir)
    if state == "done":
        print(f"{output_dir}: finished, skipped")
        return
    print(f"\n{output_dir}: {'resuming' if state == 'resume' else 'starting'}: python vineppo.py {' '.join(argv)}")
    vineppo.main(argv + (["--resume"] if state == "resume" else ["--overwrite"]))


def finished_runs(sfts: list[dict], planned: list[dict]) -> tuple[dict, list[dict], dict]:
    """What the report reads, from the runs finished with the experiment's settings only (`changed_settings`,
    the check training makes): each SFT model's pass@1 (256 held-out problems x 4) and every RL run,
    summarised (`vineppo.summarize_run`) with its metrics. Also the finished runs left out, made with other
    settings: {run directory: the settings that differ}."""
    sft, runs, left_out = {}, [], {}
    for job in sfts + planned:
        changed = changed_settings(job["argv"], job["dir"])
        if changed:
            left_out[job["dir"]] = changed
        elif changed == [] and "label" in job:
            sft[job["label"]] = vineppo.read_metrics(job["dir"])[0]["eval/pass@1"]
        elif changed == []:
            runs.append({**vineppo.summarize_run(job["dir"]), "setting": job["setting"], "seed": job["seed"],
                         "records": vineppo.read_metrics(job["dir"])})
    return sft, runs, left_out


# --- aggregation by setting and method (pure functions of the runs' metrics) ---------------------
def time_to_reach(records: list[dict], target: float) -> dict | None:
    """The first evaluation after the start at which pass@1 reached `target`: its iteration, seconds of RL
    (the critic's warm-up included) and tokens generated so far (warm-up included); None if never."""
    tokens = 0
    for r in records:
        tokens += sum(r.get(key, 0) for key in vineppo.TOKEN_KEYS)
        if r["iteration"] > 0 and r.get("eval/pass@1", -1.0) >= target - 1e-9:  # a count over samples: ties count
            return {"iteration": r["iteration"], "tokens": tokens,
                    "seconds": r["time/elapsed_s"] + records[0].get("time/critic_warmup_s", 0.0)}
    return None


def halfway(records: list[dict], target: float) -> dict | None:
    """`time_to_reach` half the way from the run's start (iteration 0) to `target`; None if never, or if
    `target` is no better than the start (no way to go)."""
    start = records[0]["eval/pass@1"]
    return time_to_reach(records, start + (target - start) / 2) if target > start else None


def peak(records: list[dict]) -> float:
    """The best pass@1 of the run's evaluations after the start."""
    return max((r["eval/pass@1"] for r in records if r["iteration"] > 0 and "eval/pass@1" in r),
               default=records[0]["eval/pass@1"])


def kl_curve(records: list[dict]) -> list[tuple[float, float]]:
    """(KL to the reference, pass@1) at each evaluation. The KL is the mean of `losses/kl` (k3 per response,
    measured during an iteration's update) over the iterations since the previous evaluation: one
    iteration's reading is noisy (on its own batch). 0 before RL."""
    points, window = [], []
    for r in records:
        if r["iteration"] > 0 and "losses/kl" in r:
            window.append(r["losses/kl"])
        if "eval/pass@1" in r:
            points.append((sum(window) / len(window) if window else 0.0, r["eval/pass@1"]))
            window = []
    return points


def pass_at_kl(records: list[dict], budget: float) -> float:
    """The best pass@1 among the run's evaluations whose KL to the reference is within `budget` (the start's
    KL is 0): accuracy for a KL spent, the paper's KL-efficiency plot read at one KL."""
    return max(p for kl, p in kl_curve(records) if kl <= budget + 1e-12)


def train_test_slope(records: list[dict]) -> float | None:
    """The least-squares slope of test pass@1 against train pass@1 (`eval/train_pass@1`) over the run's
    evaluations: test accuracy gained per unit of training accuracy. None without two distinct train values."""
    points = [(r["eval/train_pass@1"], r["eval/pass@1"]) for r in records if "eval/train_pass@1" in r]
    if len({x for x, _ in points}) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def aggregate(runs: list[dict], critics: list[str]) -> list[dict]:
    """Rows of the tables, per setting and critic, from finished runs ({setting, critic, seed, before, after,
    credit_ev, tokens, records}), mean and std over seeds; `minus` entries: the first critic's minus this
    one's, paired by seed (absent for the first critic):
    - pass@1 before and after, the gain (`lead`: minus), credit_ev, tokens; gain_minus_demo: this setting's gain
      minus the same critic's in the demo's setting, paired by seed (a sweep's effect on each method);
    - halfway (`halfway`) to the best final pass@1 among the critics of the same seed, averaged over the seeds
      that reached it, and halfway_reached (reached, seeds whose best final pass@1 beat the start);
    - to_ppo_peak: `time_to_reach` the best pass@1 of the `value` run of the same seed (the paper's "time to
      PPO's peak"), over the seeds that reached it; ppo_over_it: PPO's own (iteration, seconds) to its peak
      over this critic's, ratios of the means over seeds where both are known;
    - at_matched_kl: `pass_at_kl` at the smallest of the seed's critics' largest KLs (every method spent
      it), and at_matched_kl_minus;
    - slope: `train_test_slope`, and slope_minus."""
    def of(critic, setting, seed):
        return next((r for r in runs if (r["critic"], r["setting"], r["seed"]) == (critic, setting, seed)), None)

    def paired(mine, value):  # the first critic's value minus this one's, seed by seed
        pairs = [(value(of(critics[0], r["setting"], r["seed"])), value(r)) for r in mine
                 if of(critics[0], r["setting"], r["seed"]) is not None]
        pairs = [a - b for a, b in pairs if a is not None and b is not None]
        return mean_std(pairs) if pairs and mine[0]["critic"] != critics[0] else None

    def spread(values):
        values = [v for v in values if v is not None]
        return mean_std(values) if values else None

    rows = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        same_setting = [r for r in runs if r["setting"] == setting]
        for critic in critics:
            mine = [r for r in same_setting if r["critic"] == critic]
            if not mine:
                continue
            row = {"setting": setting, "critic": critic, "seeds": [r["seed"] for r in mine]}
            for key in ("before", "after", "tokens"):
                row[key] = mean_std([r[key] for r in mine])
            row["gain"] = mean_std([r["after"] - r["before"] for r in mine])
            row["credit_ev"] = spread([r["credit_ev"] for r in mine])
            row["lead"] = paired(mine, lambda r: r["after"] - r["before"])
            demo = [(of(critic, "demo", r["seed"]), r) for r in mine if setting != "demo" and of(critic, "demo", r["seed"])]
            row["gain_minus_demo"] = mean_std([(r["after"] - r["before"]) - (d["after"] - d["before"]) for d, r in demo]) \
                if demo else None
            reached, gained = [], 0  # gained: runs whose seed's best final pass@1 beats their start
            for r in mine:
                best = max(o["after"] for o in same_setting if o["seed"] == r["seed"])
                gained += best > r["before"]
                reached.append(halfway(r["records"], best))
            done = [h for h in reached if h is not None]
            row["halfway"] = {key: mean_std([h[key] for h in done]) for key in ("iteration", "seconds", "tokens")} \
                if done else None
            row["halfway_reached"] = (len(done), gained)
            ppo = {r["seed"]: of("value", setting, r["seed"]) for r in mine}
            times = {r["seed"]: time_to_reach(r["records"], peak(ppo[r["seed"]]["records"])) for r in mine if ppo[r["seed"]]}
            done = [t for t in times.values() if t is not None]
            row["to_ppo_peak"] = {key: mean_std([t[key] for t in done]) for key in ("iteration", "seconds", "tokens")} \
                if done else None
            row["to_ppo_peak_reached"] = (len(done), len(times))
            both = [(time_to_reach(ppo[s]["records"], peak(ppo[s]["records"])), t) for s, t in times.items() if t]
            row["ppo_over_it"] = {key: sum(p[key] for p, _ in both) / sum(t[key] for _, t in both)
                                  for key in ("iteration", "seconds")} if both else None
            budget = {r["seed"]: min(max(kl for kl, _ in kl_curve(o["records"])) for o in same_setting
                                     if o["seed"] == r["seed"]) for r in mine}
            row["kl_budget"] = mean_std(list(budget.values()))
            row["at_matched_kl"] = mean_std([pass_at_kl(r["records"], budget[r["seed"]]) for r in mine])
            row["at_matched_kl_minus"] = paired(mine, lambda r: pass_at_kl(r["records"], budget[r["seed"]]))
            row["slope"] = spread([train_test_slope(r["records"]) for r in mine])
            row["slope_minus"] = paired(mine, lambda r: train_test_slope(r["records"]))
            rows.append(row)
    return rows


# --- report: tables, figures, results ------------------------------------------------------------
def pm(pair, digits=3, sign=""):
    return "" if pair is None else f"{pair[0]:{sign}.{digits}f} ± {pair[1]:.{digits}f}"


def print_experiment_tables(rows: list[dict], critics: list[str]) -> None:
    """Two tables, one line per setting and critic, mean ± std over seeds: the gain; the paper's claims."""
    first = critics[0] + " minus it"
    header = (f"{'setting':<16} {'critic':<6} {'n':>2}  {'pass@1 before -> after':<29} {'gain':<15} {first:<16} "
              f"{'minus demo':<16} {'ev':<11} {'halfway: iteration':<19} {'seconds':>7} {'tokens':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        half, (reached, of) = row["halfway"], row["halfway_reached"]
        iteration = ("no gain" if not of else pm(half["iteration"], 1) if half else "not reached") + (
            f" ({reached}/{of})" if of and (reached < of or of < len(row["seeds"])) else "")
        seconds = f"{half['seconds'][0]:.0f}" if half else ""
        print(f"{row['setting']:<16} {row['critic']:<6} {len(row['seeds']):>2}  {pm(row['before'])} -> "
              f"{pm(row['after'])} {pm(row['gain'], sign='+'):<15} {pm(row['lead'], sign='+'):<16} "
              f"{pm(row['gain_minus_demo'], sign='+'):<16} {pm(row['credit_ev'], 2) or 'n/a':<11} {iteration:<19} "
              f"{seconds:>7} {row['tokens'][0] / 1e3:6.0f}k")
    print("n: seeds; gain, minus: mean ± std over seeds (minus: paired by seed); minus demo: the gain minus the same "
          "method's in the demo's setting, paired by seed; ev: the credit's explained variance of "
          "the returns; halfway: the first evaluation at half the way from the start to the seed's best final pass@1 "
          "(reached/seeds where the best beat the start, if not all), and its seconds of RL (evaluations and the "
          "critic's warm-up included); tokens: generated per run, all rollouts")
    header = (f"{'setting':<16} {'critic':<6} {'to PPO peak: iteration':<23} {'seconds':>7} {'tokens':>7} "
              f"{'PPO/it: it., s':<15} {'pass@1 at KL':<14} {'(KL)':>6} {first:<16} {'test/train slope':<16} {first}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        to_peak, (reached, of), ratio = row["to_ppo_peak"], row["to_ppo_peak_reached"], row["ppo_over_it"]
        iteration = (pm(to_peak["iteration"], 1) if to_peak else "not reached" if of else "no PPO run") + (
            f" ({reached}/{of})" if reached < of else "")
        seconds, tokens = (f"{to_peak['seconds'][0]:.0f}", f"{to_peak['tokens'][0] / 1e3:.0f}k") if to_peak else ("", "")
        ratios = f"{ratio['iteration']:.1f}x, {ratio['seconds']:.1f}x" if ratio else ""
        print(f"{row['setting']:<16} {row['critic']:<6} {iteration:<23} {seconds:>7} {tokens:>7} {ratios:<15} "
              f"{pm(row['at_matched_kl']):<14} {row['kl_budget'][0]:6.3f} {pm(row['at_matched_kl_minus'], sign='+'):<16} "
              f"{pm(row['slope'], 2) or 'n/a':<16} {pm(row['slope_minus'], 2, sign='+')}")
    print("to PPO peak: the first evaluation at which the run reached the best pass@1 of the seed's PPO (value) run, "
          "mean over the seeds that reached it, with seconds of RL and tokens to it; PPO/it: PPO's iterations and "
          "seconds to its own peak over this run's to it; pass@1 at KL: the best pass@1 of the evaluations within "
          "a KL to the reference that every method of the seed reached (KL: k3 per response, mean budget); "
          "test/train slope: test pass@1 gained per unit of train pass@1 (least squares over evaluations)")


NAMES = {"mc": "VinePPO (mc)", "value": "PPO (value, tuned)", "grpo": "GRPO", "rloo": "RLOO"}
COLORS = {"mc": "C0", "value": "C1", "grpo": "C2", "rloo": "C3"}


def save_gain_figure(rows: list[dict], critics: list[str], xlabel: str, path: str) -> str:
    """Left: the gain in pass@1 of each method per setting; right: the first method's gain minus each other's,
    paired by seed; both ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for shift, critic in zip((-0.15, 0, 0.15, 0.3), critics):
        for ax, key in zip(axes, ("gain", "lead")):
            mine = [r for r in rows if r["critic"] == critic and r[key] is not None]
            if mine:
                ax.errorbar([shift + settings.index(r["setting"]) for r in mine], [r[key][0] for r in mine],
                            yerr=[r[key][1] for r in mine], marker="o", capsize=3, color=COLORS[critic],
                            label=NAMES[critic] if key == "gain" else f"minus {critic}")
    for ax, label in zip(axes, ("pass@1 gain from RL", f"{critics[0]}'s gain minus the other's")):
        ax.set_xticks(range(len(settings)), settings)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{label} (mean ± std over seeds)", fontsize=9)
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no lead to draw when only the first method has finished runs
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_curves_figure(runs: list[dict], critics: list[str], path: str) -> str:
    """Per setting (a column): pass@1 against the KL to the reference at each evaluation (the paper's KL
    efficiency) and, where the runs evaluated training problems, test against train pass@1 (its
    generalization figure). One line per run, a color per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in runs))
    panels = 2 if any("eval/train_pass@1" in rec for r in runs for rec in r["records"]) else 1
    fig, axes = plt.subplots(panels, len(settings), figsize=(4.5 * len(settings), 3.8 * panels), squeeze=False)
    for column, setting in enumerate(settings):
        for critic in critics:
            for n, r in enumerate(x for x in runs if (x["setting"], x["critic"]) == (setting, critic)):
                label = NAMES[critic] if n == 0 else None
                kl, test = zip(*kl_curve(r["records"]))
                axes[0][column].plot(kl, test, marker=".", color=COLORS[critic], alpha=0.7, label=label)
                train = [(rec["eval/train_pass@1"], rec["eval/pass@1"]) for rec in r["records"] if "eval/train_pass@1" in rec]
                if panels == 2 and train:
                    axes[1][column].plot(*zip(*train), marker=".", color=COLORS[critic], alpha=0.7, label=label)
        axes[0][column].set(title=setting, xlabel="KL to the reference (k3, per response)", ylabel="test pass@1")
        if panels == 2:
            axes[1][column].set(xlabel="train pass@1 (a fixed subset)", ylabel="test pass@1")
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def experiment_main(argv: list[str], lengths: bool) -> dict:
    args = parse_experiment_args(argv, lengths)
    sfts, planned = length_plan(args) if lengths else sweep_plan(args)
    critics, start = args.critics.split(","), time.time()
    name = "" if lengths else sweep_settings(args)[0]["flag"].replace("_", "-")
    if not args.report:
        for job in planned:  # every run's settings are checked before the first is trained (its model may not
            vineppo.parse_args(job["argv"] + ["--model", "tiny"])  # exist yet: the tiny one stands in)
        os.makedirs(args.output_dir, exist_ok=True)
        try:
            for job in sfts + planned:
                train(job["argv"], job["dir"])
        except SystemExit as stop:
            if stop.code not in (None, 0):
                print("the experiment stopped; the same command continues it (finished runs are skipped)",
                      file=sys.stderr)
            raise
    sft, runs, left_out = finished_runs(sfts, planned)
    for run_dir, changed in left_out.items():
        print(f"{run_dir}: left out, made with other settings ({', '.join(changed)})")
    if not runs:
        sys.exit(f"error: {args.output_dir} holds no finished run made with these settings; " + (
            f"{len(left_out)} made with others are named above: give the flags they were made with" if left_out
            else f"run python compare_critics.py {'--lengths' if lengths else '--sweep ' + args.sweep}"))
    rows = aggregate(runs, critics)
    print("SFT models, pass@1 (256 held-out problems x 4): " + ", ".join(f"{k} {v:.3f}" for k, v in sft.items()))
    print_experiment_tables(rows, critics)
    stem = "results.json" if lengths else f"results-{name}.json"
    try:
        figures = [save_gain_figure(rows, critics, "chain length (operations)" if lengths else name,
                                    os.path.join(args.output_dir, "lengths.png" if lengths else f"gains-{name}.png")),
                   save_curves_figure(runs, critics, os.path.join(args.output_dir, f"curves{name and '-' + name}.png"))]
    except ImportError:
        figures = []
        print("matplotlib is not installed: no figures (pip install matplotlib)")
    out = {"args": asdict(args), "settings": length_settings(args) if lengths else sweep_settings(args),
           "sft_pass@1": sft, "rows": rows, "figures": figures,
           "runs": [{k: v for k, v in r.items() if k != "records"} for r in runs], "left_out": left_out,
           "seconds": time.time() - start}
    with open(os.path.join(args.output_dir, stem), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{len(runs)} runs | {os.path.join(args.output_dir, stem)}" + "".join(f", {f}" for f in figures))
    return out


if __name__ == "__main__":
    main()
