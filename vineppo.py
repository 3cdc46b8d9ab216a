"""VinePPO in one file: PPO for LLM reasoning with Monte Carlo credit assignment.

Kazemnejad et al., "VinePPO: Refining Credit Assignment in RL Training of LLMs" (arXiv 2410.01679).

    python vineppo.py                        # offline demo: tiny model, built-in arithmetic task, CPU
    python vineppo.py --critic value         # the same run, but classic PPO with a learned value network
    python vineppo.py --model Qwen2.5-0.5B                 # GSM8K with the paper's settings (GPU, hub)
    python vineppo.py --model Qwen2.5-0.5B --task math     # MATH (train 12k - MATH500, test MATH500)
    python vineppo.py --show-credit 2        # also print 2 responses step by step: V(s) and advantages
    python vineppo.py --plot runs/a runs/b   # overlay the curves of finished runs (each run writes curves.png)
    python vineppo.py --resume               # continue a stopped run (Ctrl-C saves a checkpoint first)

PART I is the method, in the paper's order: Args -> steps -> sampling with `generate` -> credit assignment
(Monte Carlo values | value network + GAE | GRPO/RLOO) -> the PPO loss and update -> the loop (`main`).
PART II, behind a fence, holds what a run needs that the paper does not describe. The two methods share
one trainer: `--critic` changes only where the advantages come from (`assign_credit`).
"""

from __future__ import annotations

import argparse
import ast
import atexit
import bisect
import copy
import functools
import importlib.util
import inspect
import itertools
import json
import math
import multiprocessing
import operator
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm
from packaging.version import Version
from transformers import GenerationConfig, __version__ as transformers_version


# ############################################################################################
# PART I: THE METHOD, in the paper's order
# ############################################################################################
@dataclass
class MethodArgs:
    """The method's knobs, with the paper's values. Part II's `Args` adds the run options; functions take an Args."""
    model: str = "tiny"
    """'tiny' builds the offline demo model; else a short name (Qwen2.5-0.5B), a hub id or a local directory"""
    task: str = "auto"
    """'arith' (built-in), 'gsm8k' or 'math'; 'auto' = arith for the tiny model, gsm8k otherwise"""
    critic: str = "mc"
    """where advantages come from: 'mc' = VinePPO's Monte Carlo values, 'value' = PPO's value network,
    'grpo' / 'rloo' = one advantage per response from its group of samples (no critic)"""
    mc_rollouts: int = 9
    """K, continuations sampled from each state to estimate its value (paper: 9)"""
    iterations: int = -1
    """RL iterations (they set the LR decay); -1 = the paper's (650 GSM8K, 1000 MATH); 0 = SFT and evaluate only"""

    # --- sampling (paper section 5 / appendix: 64 prompts x 8 samples, T=0.6, top_p=0.9, 1024 tokens)
    prompts_per_iteration: int = 64
    """problems sampled per iteration (paper: 64)"""
    samples_per_prompt: int = 8
    """responses sampled per problem (paper: 8)"""
    temperature: float = 0.6
    """sampling temperature for responses AND Monte Carlo continuations (paper: 0.6)"""
    top_p: float = 0.9
    """nucleus sampling threshold (paper: 0.9)"""
    max_new_tokens: int = 1024
    """length limit of a response; a response cut by it gets reward 0 (paper: 1024)"""
    step_split: str = "line"
    """how responses are cut into steps: 'line' = the task's rule (paper), 'tokens' = fixed-size token chunks"""
    step_chunk_tokens: int = 8
    """tokens per step with --step-split tokens"""
    max_states_per_response: int = -1
    """states valued per response (s_0 included; later ones get V = R); -1 = official: 26, all on MATH; 0 = all"""

    # --- PPO update (paper: 2 epochs, minibatch 64, AdamW lr 1e-6, 3% warmup, clip 0.2, beta 1e-4)
    epochs: int = 2
    """passes over each iteration's responses (paper: 2)"""
    minibatch_size: int = 64
    """responses per optimizer step (paper: 64)"""
    lr: float = 1e-6
    """AdamW learning rate of the policy and of the value network (paper: 1e-6)"""
    warmup_ratio: float = 0.03
    """fraction of optimizer steps with linear warmup, then linear decay to 0 (paper: 3%)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (paper: 1.0)"""
    clip_range: float = 0.2
    """PPO ratio clip epsilon (paper: 0.2)"""
    kl_coef: float = 1e-4
    """beta, weight of the k3 KL to the reference policy in the loss (paper: 1e-4)"""
    value_lr: float = -1
    """AdamW learning rate of the value network; -1 = the policy's --lr (paper)"""
    value_clip_range: float = 0.2
    """value-loss clip around the old values, value critic only (paper: 0.2)"""
    critic_warmup: int = 0
    """before RL, train the value network alone on this many iterations of the SFT policy's rollouts"""
    gamma: float = 1.0
    """discount of GAE, value critic only (paper: 1)"""
    gae_lambda: float = 1.0
    """lambda of GAE, value critic only (paper: 1)"""

    # --- supervised warm-up (paper: the RL start is an SFT model, 2 epochs, lr 1e-5 at 1.1B)
    sft_epochs: float = 2.0
    """epochs of supervised fine-tuning on reference solutions before RL; 0 skips it (paper: 2)"""
    sft_lr: float = 1e-5
    """learning rate of the SFT stage (paper: 1e-5 for 1.1B models)"""
    sft_batch_size: int = 64
    """sequences per SFT step"""


# ============================================================================================
# 1. Steps: split a response on its text, then map the steps to tokens (paper section 4)
# ============================================================================================
def split_steps(text: str) -> list[str]:
    """Split a response into reasoning steps on its text; the steps re-join to the text exactly.

    GSM8K rule (paper section 4, official code: tasks/gsm8k.py): one step per line, each later step with its
    own leading newline; the '#### answer' line and anything after it join the last step. Unlike the official
    code, a blank line is no step of its own: it joins the step after it (trailing ones the last step).

    >>> split_steps("\\n7+5=12\\n12*3=36\\n#### 36\\n")
    ['\\n7+5=12', '\\n12*3=36\\n#### 36\\n']
    """
    steps, pending, answered = [], "", False  # `pending` holds blank lines waiting for the next real line
    for piece in re.split(r"(?=\n)", text):  # cut before every newline: "a\nb" -> ["a", "\nb"]
        if not piece.strip():
            pending += piece
        elif steps and (answered or piece.lstrip().startswith("####")):
            steps[-1] += pending + piece  # the answer line, and all text after it, join the last step
            pending = ""
        else:
            steps.append(pending + piece)
            pending = ""
        answered = answered or piece.lstrip().startswith("####")
    if steps:
        steps[-1] += pending
    else:  # only blank lines (or nothing)
        steps = [text]
    assert "".join(steps) == text, "steps must re-join to the response"
    return steps


def split_response(task: str, text: str) -> list[str]:
    """The task's step rule: MATH's math-aware rule for 'math' (Part II), one step per line otherwise."""
    return split_math_steps(text) if task == "math" else split_steps(text)


def step_token_starts(decode, response_ids: list[int], steps: list[str]) -> list[int]:
    """Map step boundaries on the text to token positions of the response, by character offsets.

    Token j starts where decode(ids[:j]) stops agreeing with the text (a partial multi-byte character
    decodes to a stray U+FFFD and is not counted). A token belongs to the step that holds its first
    character, so one that spans a boundary (BPE merges like ".\\n") stays with the step it starts in;
    a step that owns no token merges into the next. Returns strictly increasing positions, the first 0.
    The states are then the trajectory's own prefixes prompt + ids[:t], never re-tokenized text.
    """
    text = "".join(steps)
    char_starts = list(itertools.accumulate(map(len, steps[:-1]), initial=0))

    def first_token_at_or_after(char: int) -> int:  # binary search; decode length grows with j
        lo, hi = 0, len(response_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(os.path.commonprefix([decode(response_ids[:mid]), text])) >= char:
                hi = mid
            else:
                lo = mid + 1
        return lo

    starts = [0]
    for char in char_starts[1:]:
        t = first_token_at_or_after(char)
        if starts[-1] < t < len(response_ids):
            starts.append(t)
    return starts


def chunk_starts(n_text_tokens: int, chunk: int) -> list[int]:
    """The exercise's alternative to lines (--step-split tokens): a new step every `chunk` tokens, wherever
    it falls (mid-number, mid-word). The EOS token, after the n_text_tokens, joins the last step.

    >>> chunk_starts(10, 4), chunk_starts(0, 4)
    ([0, 4, 8], [0])
    """
    return list(range(0, max(1, n_text_tokens), chunk))


# ============================================================================================
# 2. Sampling from pi_old with `generate` (paper section 5: T = 0.6, top_p = 0.9)
# ============================================================================================
@dataclass
class Episode:
    """One sampled response and everything the update needs about it."""
    problem_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # includes the EOS token when the response ended by itself
    text: str  # decoded response without EOS
    reward: float
    truncated: bool  # hit max_new_tokens without EOS (reward 0)
    steps: list[str] = field(default_factory=list)  # the response text split into steps
    step_starts: list[int] = field(default_factory=list)  # token where each step begins (<= len(steps))
    step_values: list[float] = field(default_factory=list)  # V(s_i) at step starts: MC, or the critic's (shown)
    token_advantages: list[float] = field(default_factory=list)  # one per response token


@torch.inference_mode()
def sample_continuations(model, prefixes: list[list[int]], budgets: list[int], *, eos_id: int, pad_id: int,
                         temperature: float, top_p: float, batch_size: int, desc: str = "sampling",
                         progress: bool = True, share_prefixes: bool = True) -> list[tuple[list[int], bool]]:
    """Sample one continuation of each prefix with `generate`; returns (new_ids, ended_with_eos) per prefix.

    Rows are sorted by prefix length so each batch pads little, at most `batch_size` rows a call. Row i may
    add at most budgets[i] tokens; one that reaches its budget without EOS is returned with False. The EOS
    token is kept in new_ids. Identical prefixes share one prefill (`shared_prefix_cache`; off with
    share_prefixes=False, for the benchmark): same rows, same decode steps, so the same random stream.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prefixes)), key=lambda i: (len(prefixes[i]), budgets[i]))
    results: list = [None] * len(prefixes)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc=desc, leave=False, disable=not progress):
        input_ids, attention_mask = (t.to(device) for t in left_pad([prefixes[i] for i in rows], pad_id))  # [rows, width]
        width = input_ids.shape[1]
        # exactly pi_old at T and top_p: top_k=0 ends the default top-k 50; library_generation_defaults: no saved config
        config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                  max_new_tokens=max(budgets[i] for i in rows), eos_token_id=eos_id, pad_token_id=pad_id)
        with autocast(device), library_generation_defaults(model):
            cache = shared_prefix_cache(model, input_ids, attention_mask) if share_prefixes else None
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                    **{CACHE_NAME: cache})
        new_tokens = output[:, width:].tolist()  # [rows, <= max budget]
        for r, i in enumerate(rows):
            ids = new_tokens[r][:budgets[i]]
            results[i] = (ids[:ids.index(eos_id) + 1], True) if eos_id in ids else (ids, False)
    return results


def sample_episodes(model, tokenizer, problems: list[dict], indices: list[int], args: Args) -> list[Episode]:
    """Sample samples_per_prompt responses per problem from pi_old and grade them; a response cut by the
    length limit gets reward 0. Then split each into steps and map the steps to tokens."""
    prompts = {i: encode_prompt(tokenizer, problems[i]["problem"]) for i in indices}
    owners = [i for i in indices for _ in range(args.samples_per_prompt)]
    outputs = sample_continuations(model, [prompts[i] for i in owners], [args.max_new_tokens] * len(owners),
                                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                   temperature=args.temperature, top_p=args.top_p,
                                   batch_size=args.rollout_batch_size, desc="sampling responses")
    decode = functools.partial(decode_response, tokenizer)
    episodes = []
    for owner, (ids, ended) in zip(owners, outputs):
        text = decode(ids)
        reward = reward_of(args.task, text, ended, problems[owner]["answer"])
        if args.step_split == "tokens":  # exercise: fixed-size token chunks instead of the task's steps
            starts = chunk_starts(len(ids) - ended, args.step_chunk_tokens)
            steps = [decode(ids[a:b]) for a, b in zip(starts, starts[1:] + [len(ids)])]
        else:
            steps = split_response(args.task, text)
            starts = step_token_starts(decode, ids, steps)
        assert 0.0 <= reward <= 1.0
        episodes.append(Episode(owner, prompts[owner], ids, text, reward, truncated=not ended, steps=steps, step_starts=starts))
    return episodes


# ============================================================================================
# 3. Credit assignment, VinePPO: Monte Carlo values of the steps' states (paper section 4)
# ============================================================================================
def episode_states(e: Episode, max_states: int | None = None) -> list[tuple[int, ...]]:
    """The states of a response: s_0 = the prompt, s_i = prompt + the response's own first t_i tokens
    (t_i = where step i starts; never re-tokenized text). Only the first max_states (None: all)."""
    return [tuple(e.prompt_ids + e.response_ids[:t]) for t in e.step_starts[:max_states]]


def state_cap(args: Args) -> int | None:
    """States valued per response (None: all). Official: s_0 + 25 step states on GSM8K, no cap on MATH."""
    cap = args.max_states_per_response
    return None if cap == 0 or (cap == -1 and args.task == "math") else 26 if cap == -1 else cap


def sample_from_states(model, tokenizer, states: list[tuple[int, ...]], prompt_lens: list[int], args: Args, *,
                       temperature: float | None = None, desc: str = "MC rollouts") -> list[tuple[list[int], bool]]:
    """One continuation of each state from pi_old, with the responses' sampling settings and within what
    is left of the response's length limit. Returns (new_ids, ended_with_eos) per state."""
    budgets = [args.max_new_tokens - (len(s) - n) for s, n in zip(states, prompt_lens)]
    return sample_continuations(model, [list(s) for s in states], budgets, eos_id=tokenizer.eos_token_id,
                                pad_id=tokenizer.pad_token_id, temperature=temperature or args.temperature,
                                top_p=args.top_p, batch_size=args.rollout_batch_size, desc=desc)


def mc_rollout(model, tokenizer, origin: dict, args: Args, counts: dict | None = None, desc: str = "MC rollouts"):
    """rollout(states) -> one reward per state, for `mc_values`. origin[state] = (gold answer, prompt length).
    Prefix + continuation is graded (the answer may straddle the boundary); a cut continuation scores 0.
    `counts`, if given, accumulates the tokens generated and the continuations cut by the length limit."""
    def rollout(states):
        outputs = sample_from_states(model, tokenizer, states, [origin[s][1] for s in states], args, desc=desc)
        rewards = []
        for state, (ids, ended) in zip(states, outputs):
            answer, prompt_len = origin[state]
            rewards.append(reward_of(args.task, decode_response(tokenizer, list(state[prompt_len:]) + ids), ended, answer))
            if counts is not None:
                counts["tokens"] += len(ids)
                counts["truncated"] += not ended
        return rewards
    return rollout


def mc_values(states: list[tuple[int, ...]], k: int, rollout) -> tuple[dict, dict]:
    """Monte Carlo value of each distinct state: the mean reward of K fresh continuations from it.

    `rollout(prefixes)` samples one continuation per prefix from pi_old and returns its reward. Identical
    states are rolled out once, all states in one call (batched together). The response that visited a
    state never counts in its value: that would bias it. Returns ({state: V(s)}, {state: [K rewards]}).
    """
    unique = list(dict.fromkeys(states))
    prefixes = [state for state in unique for _ in range(k)]  # [n_unique * K]
    rewards = rollout(prefixes)
    per_state = {state: rewards[i * k:(i + 1) * k] for i, state in enumerate(unique)}
    values = {state: sum(r) / k for state, r in per_state.items()}  # V(s) = mean of K rewards
    return values, per_state


def step_advantages(values: list[float], reward: float, n_steps: int | None = None) -> list[float]:
    """Step advantages with gamma = 1: A_i = r_i + V(s_{i+1}) - V(s_i), where V(s_n) = 0 (terminal) and
    r_i = 0 except r_{n-1} = R. So A_i = V(s_{i+1}) - V(s_i) and A_{n-1} = R - V(s_{n-1}); they telescope
    to R - V(s_0).

    >>> step_advantages([0.5, 0.25, 1.0], reward=1.0)
    [-0.25, 0.75, 0.0]

    If only the first len(values) of n_steps states were valued (the official GSM8K cap), every later
    state gets V = R, filled back from the return: the last valued step gets R - V(s_last), later steps
    0, and the sum is still R - V(s_0).
    >>> step_advantages([0.5, 0.25], reward=1.0, n_steps=4)
    [-0.25, 0.75, 0.0, 0.0]
    """
    values = values + [reward] * ((n_steps or len(values)) - len(values))  # past the cap: V = R
    next_values = values[1:] + [0.0]  # V(s_n) = 0: the terminal state has no value
    step_rewards = [0.0] * (len(values) - 1) + [reward]
    return [r + v_next - v for r, v_next, v in zip(step_rewards, next_values, values)]


def token_advantages(step_advs: list[float], step_starts: list[int], n_tokens: int) -> list[float]:
    """Every token takes the advantage of its step (the EOS token, last, takes the last step's)."""
    assert len(step_advs) == len(step_starts) and step_starts[0] == 0
    return [step_advs[bisect.bisect_right(step_starts, t) - 1] for t in range(n_tokens)]


def assign_mc_advantages(model, tokenizer, episodes: list[Episode], problems: list[dict], args: Args) -> dict:
    """VinePPO's credit: V(s_i) by Monte Carlo from the step boundaries of every response (the first `state_cap`),
    all rolled out together from pi_old before any update; then step advantages, then one advantage per token."""
    states_of = [episode_states(e, state_cap(args)) for e in episodes]
    origin = dict(every_rank([(s, (problems[e.problem_index]["answer"], len(e.prompt_ids)))
                              for e, states in zip(episodes, states_of) for s in states]))
    counts = defaultdict(int)  # under torchrun: every rank's states deduplicated together, rolled out in even shares
    values, per_state = mc_values(every_rank([s for states in states_of for s in states]), args.mc_rollouts,
                                  rank_shard_rollouts(mc_rollout(model, tokenizer, origin, args, counts)))
    for e, states in zip(episodes, states_of):
        e.step_values = [values[s] for s in states]
        step_advs = step_advantages(e.step_values, e.reward, n_steps=len(e.step_starts))
        e.token_advantages = token_advantages(step_advs, e.step_starts, len(e.response_ids))
        assert len(e.token_advantages) == len(e.response_ids)  # one advantage per response token
    stds = [torch.tensor(r).std(unbiased=False).item() for r in per_state.values()]
    return {"tokens/mc": counts["tokens"], "mc/states": len(values), "mc/value_std": sum(stds) / len(stds),
            "mc/truncated_frac": global_sum(counts["truncated"]) / max(1, len(values) * args.mc_rollouts)}


# ============================================================================================
# 3'. Credit assignment, classic PPO: a learned value network and GAE (the paper's baseline)
# ============================================================================================
class ValueNetwork(nn.Module):
    """PPO's critic: a separate copy of the starting model's transformer with a linear head (hidden -> 1)
    on every position; values[b, p] estimates V of the state that ends at position p."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # a decoder without its LM head
        self.head = nn.Linear(backbone.config.hidden_size, 1)  # as the official critic's: N(0, 1/sqrt(H+1)), bias 0
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(backbone.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()))

    @classmethod
    def from_policy(cls, policy) -> "ValueNetwork":
        return cls(copy.deepcopy(policy.base_model))

    @classmethod
    def load(cls, path: str) -> "ValueNetwork":
        """Reload a saved critic (<output-dir>/final/value: the backbone's files and value_head.pt)."""
        from transformers import AutoModel
        network = cls(AutoModel.from_pretrained(path))
        network.head.load_state_dict(torch.load(os.path.join(path, "value_head.pt"), weights_only=True))
        return network

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # [B, L, hidden]
        return self.head(hidden).squeeze(-1).float()  # [B, L]


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over response tokens: delta_t = r_t + gamma V(s_{t+1}) - V(s_t) (V = 0 after the last token),
    A_t = delta_t + gamma lambda A_{t+1}, returns = A + V; with gamma = lambda = 1, A_t = R - V(s_t).
    rewards, values, mask: [B, T], right-aligned. Returns (advantages, returns), [B, T], zero at padding."""
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ============================================================================================
# 3''. Credit assignment without a critic: GRPO and RLOO (one advantage per response)
# ============================================================================================
def group_advantages(rewards: list[float], groups: list[int], method: str) -> list[float]:
    """One advantage per response from the other samples of its problem (its group); no value of any state.

    'grpo' (Shao et al. 2024): A = (R - group mean) / (group std + 1e-4), sample std (n - 1) as in TRL;
    'rloo' (Ahmadian et al. 2024): A = R - mean of the OTHER responses. A group of one, or of equal rewards, gets 0.

    >>> group_advantages([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], "rloo")
    [1.0, -0.3333333333333333, -0.3333333333333333, -0.3333333333333333]
    >>> group_advantages([1.0, 1.0, 0.0], [0, 0, 1], "grpo")
    [0.0, 0.0, 0.0]
    """
    if method not in ("grpo", "rloo"):
        raise ValueError(f"method must be 'grpo' or 'rloo', got {method!r}")
    members = defaultdict(list)
    for reward, group in zip(rewards, groups):
        members[group].append(reward)
    advantages = []
    for reward, group in zip(rewards, groups):
        rs = members[group]
        n, mean = len(rs), sum(rs) / len(rs)
        if n == 1:
            advantages.append(0.0)  # no other sample to compare with
        elif method == "grpo":
            std = math.sqrt(sum((r - mean) ** 2 for r in rs) / (n - 1))
            advantages.append((reward - mean) / (std + 1e-4))
        else:  # rloo
            advantages.append(reward - (sum(rs) - reward) / (n - 1))  # leave-one-out mean
    return advantages


# ============================================================================================
# 3'''. The toggle: the ONLY place where the methods differ
# ============================================================================================
def assign_credit(episodes: list[Episode], batch: dict, fixed: dict, policy, tokenizer, problems: list[dict],
                  args: Args) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Token advantages [B, T] (right-aligned like `collate`), returns [B, T] for the value network's loss
    (None without one), and statistics. Each episode keeps its step values and token advantages, for
    the credit view. Like the official trainer: the same update, the advantages from elsewhere."""
    width = batch["response_mask"].shape[1]
    if args.critic == "value":  # GAE on the critic's V(s_t); R sits on the last response token
        rewards = right_aligned([[0.0] * (len(e.response_ids) - 1) + [e.reward] for e in episodes], width)
        advantages, returns = gae_advantages(rewards, fixed["values_old"], batch["response_mask"],
                                             gamma=args.gamma, lam=args.gae_lambda)
        store_critic_credit(episodes, advantages, fixed["values_old"])
        return advantages, returns, {"tokens/mc": 0, "value/explained_variance":
                                     explained_variance(fixed["values_old"], returns, batch["response_mask"])}
    if args.critic == "mc":
        stats = assign_mc_advantages(policy, tokenizer, episodes, problems, args)
        # credit quality, as the critic's: V(s) of each token's step against R, on tokens whose state was valued
        values = right_aligned([token_advantages(e.step_values + [math.nan] * (len(e.step_starts) - len(e.step_values)),
                                                 e.step_starts, len(e.response_ids)) for e in episodes], width)
        returns = right_aligned([[e.reward] * len(e.response_ids) for e in episodes], width)
        stats["mc/explained_variance"] = explained_variance(values.nan_to_num(), returns,
                                                            batch["response_mask"] * ~values.isnan())
    else:  # grpo, rloo: every token of a response gets the response's advantage; no state is valued
        advantages = group_advantages([e.reward for e in episodes], [e.problem_index for e in episodes], args.critic)
        for e, advantage in zip(episodes, advantages):
            e.step_values, e.token_advantages = [], [advantage] * len(e.response_ids)
        stats = {"tokens/mc": 0, "group/advantage_abs": sum(map(abs, advantages)) / len(advantages)}
    return right_aligned([e.token_advantages for e in episodes], width), None, stats


# ============================================================================================
# 4. The PPO loss (paper section 3 and appendix: the same loss for every critic)
# ============================================================================================
def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Left-pad prompt+response sequences so every response ends at the last column: per-token quantities
    are then [B, T], right-aligned. Position ids count real tokens only, as `generate` counted them."""
    input_ids, attention_mask = left_pad([p + r for p, r in zip(prompts, responses)], pad_id)  # [B, L]
    response_mask = right_aligned([[1.0] * len(r) for r in responses], max(map(len, responses)))  # [B, T]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                response_mask=response_mask)


def response_logprobs(model, mb: dict, temperature: float) -> torch.Tensor:
    """log pi(token | prefix) for every response token, from logits divided by the sampling temperature
    (so pi_old recomputed here is the distribution that was sampled from). Returns [B, T] in fp32. Only the
    sampled token's logit and the logsumexp are needed, and a large vocabulary's logits [B, T, vocab] would be the
    largest tensors (Qwen2.5: 4.6 GiB at 8 x 1,024 tokens): `logits_in_chunks` (Part II) makes them in chunks."""
    targets = mb["input_ids"][:, -mb["response_mask"].shape[1]:]  # [B, T]; position p predicts token p+1

    def logprobs(logits, targets):  # [B, t, vocab], [B, t] -> [B, t]: log softmax at the sampled tokens
        logits = logits.float() / temperature
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    with autocast(mb["input_ids"].device):
        return logits_in_chunks(model, mb, targets, logprobs) * mb["response_mask"]


def response_values(value_model, mb: dict) -> torch.Tensor:
    """V(s_t) for the state before each response token t: the value at the position just before it. [B, T]"""
    n = mb["response_mask"].shape[1]
    with autocast(mb["input_ids"].device):
        values = value_model(mb["input_ids"], mb["attention_mask"], mb["position_ids"])  # [B, L]
    return values[:, -n - 1:-1] * mb["response_mask"]


def masked_mean_var(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) variance over the entries where mask is 1, of every rank under torchrun."""
    n = global_sum(mask.sum())  # global_sum: the sum over the ranks (Part II); the value itself in one process
    mean = global_sum((values * mask).sum()) / n
    return mean, global_sum((((values - mean) * mask) ** 2).sum()) / n


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(A - mean) / sqrt(var + 1e-8) over the masked entries (all response tokens of a minibatch)."""
    mean, var = masked_mean_var(values, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate, per token max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = pi/pi_old; returns the
    per-token losses [B, T] (zero at padding) and statistics. Log-ratios are masked BEFORE exp."""
    log_ratio = torch.where(mask.bool(), logp - logp_old, 0.0)  # fp32; padding -> ratio 1, never inf/nan
    ratio = torch.exp(log_ratio.clamp(max=20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    losses = torch.maximum(unclipped, clipped) * mask
    stats = {"clipped": ((clipped > unclipped).float() * mask).sum().item(), "ratio_sum": (ratio * mask).sum().item(),
             "approx_kl": (((ratio - 1) - log_ratio) * mask).sum().item()}  # KL(pi_old || pi), k3, summed
    return losses, stats


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = logp_ref - logp, clamped to
    [0, 10] (official code); never negative, zero where the policies agree. [B, T], zero at padding."""
    d = torch.where(mask.bool(), logp_ref - logp, 0.0).clamp(-1e4, 20.0)  # padding masked before exp
    return (torch.exp(d) - d - 1).clamp(0.0, 10.0) * mask


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    """Clipped value loss 0.5 * max((V - ret)^2, (clip(V, V_old +- eps) - ret)^2), per token [B, T]."""
    clipped = values_old + (values - values_old).clamp(-clip_range, clip_range)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2) * mask


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(target - predicted) / Var(target) over masked entries: 1 is perfect, 0 is a constant guess
    (and 0 when the targets do not vary: there is nothing to explain)."""
    variance = masked_mean_var(target, mask)[1]
    return float(1 - masked_mean_var(target - predicted, mask)[1] / variance) if variance > 1e-8 else 0.0


# ============================================================================================
# 5. The update: log-probs of pi_old and the reference fixed once, then epochs of minibatches
# ============================================================================================
@torch.inference_mode()
def precompute(policy, reference, value_model, batch: dict, args: Args, device) -> dict:
    """Quantities fixed during the update: log-probs of pi_old and of the reference, and old values."""
    out = {key: torch.zeros_like(batch["response_mask"]) for key in ("logp_old", "logp_ref", "values_old")}
    if args.offload_reference:
        reference.to(device)  # lives on the CPU, visits the GPU only here
    for rows in torch.arange(len(batch["input_ids"])).split(args.micro_batch_size):
        mb = slice_batch(batch, rows, device)
        n = mb["response_mask"].shape[1]
        out["logp_old"][rows, -n:] = response_logprobs(policy, mb, args.temperature).cpu()
        out["logp_ref"][rows, -n:] = response_logprobs(reference, mb, args.temperature).cpu()
        if value_model is not None:
            out["values_old"][rows, -n:] = response_values(value_model, mb).cpu()
    if args.offload_reference:
        reference.to("cpu")
        torch.cuda.empty_cache()  # its GPU memory back (nothing to do without CUDA)
    return out


def minibatch_backward(policy, value_model, batch: dict, fixed: dict, advantages: torch.Tensor,
                       returns: torch.Tensor | None, minibatch: torch.Tensor, args: Args, device) -> dict:
    """Forward and backward of one minibatch, micro-batch by micro-batch (memory only): advantages whitened
    over the minibatch, the clipped surrogate averaged over its tokens, the k3 KL to the reference summed
    per response and averaged over responses (paper appendix). Returns sums of losses and statistics."""
    whitened = whiten(advantages[minibatch], batch["response_mask"][minibatch])  # [mb, T], global statistics
    sums = defaultdict(float, tokens=batch["response_mask"][minibatch].sum().item())  # this rank's tokens
    n_tokens, n_responses = global_sum(sums["tokens"]), global_sum(len(minibatch))  # of the whole minibatch
    for start in range(0, len(minibatch), args.micro_batch_size):
        rows = minibatch[start:start + args.micro_batch_size]
        mb = slice_batch(batch, rows, device)
        mask, n = mb["response_mask"], mb["response_mask"].shape[1]  # [rows, n]: the minibatch's columns
        logp = response_logprobs(policy, mb, args.temperature)  # [rows, n]
        pg_losses, stats = ppo_policy_loss(logp, fixed["logp_old"][rows, -n:].to(device),
                                           whitened[start:start + len(rows), -n:].to(device), mask, args.clip_range)
        policy_loss = pg_losses.sum() / n_tokens  # token-level mean over the minibatch
        kl = k3_kl(logp, fixed["logp_ref"][rows, -n:].to(device), mask).sum() / n_responses  # per response
        (policy_loss + args.kl_coef * kl).backward()
        for key, value in [("policy_loss", policy_loss.item()), ("kl", kl.item()), ("clipped", stats["clipped"]),
                           ("approx_kl", stats["approx_kl"]), ("ratio", stats["ratio_sum"])]:
            sums[key] += value
        if value_model is not None:  # the critic regresses V(s_t) on the returns, clipped around V_old
            values = response_values(value_model, mb)  # [rows, n]
            v_loss = value_loss(values, fixed["values_old"][rows, -n:].to(device), returns[rows, -n:].to(device),
                                mask, args.value_clip_range).sum() / n_tokens
            v_loss.backward()
            sums["value_loss"] += v_loss.item()
    return sums


def ppo_update(policy, value_model, optimizers, schedulers, batch: dict, fixed: dict, advantages: torch.Tensor,
               returns: torch.Tensor | None, args: Args, device, nonfinite_in_a_row: int = 0) -> dict:
    """The PPO update shared by every critic (paper appendix): `epochs` passes over the responses in
    shuffled minibatches, one optimizer step each (gradient norm clipped). A minibatch whose mean ratio
    exceeds 10 is skipped, and so is a step with a non-finite loss or gradient (it never reaches the
    weights); max_nonfinite_steps of those in a row, counting from `nonfinite_in_a_row`, stop the run."""
    totals = defaultdict(float)
    trained = [model for model in (policy, value_model) if model is not None]
    for model in trained:  # train() only to let gradient checkpointing run; dropout is zeroed
        model.train(args.gradient_checkpointing)
    for epoch in range(args.epochs):
        minibatches = shuffled_minibatches(len(batch["input_ids"]), args.minibatch_size)  # randperm, global (Part II)
        for minibatch in tqdm(minibatches, desc=f"PPO update, epoch {epoch + 1}", leave=False):
            sums = minibatch_backward(policy, value_model, batch, fixed, advantages, returns, minibatch, args, device)
            sums = global_sums(sums)  # under torchrun every rank's sums and gradients are added, so all ranks
            sum_gradients(trained)  # take the same skip and non-finite decisions and the same step
            skip = sums.pop("ratio") / sums["tokens"] > 10.0  # official: loss x 0, here no step (README)
            grad_norms = [torch.nn.utils.clip_grad_norm_([p for g in o.param_groups for p in g["params"]],
                                                         args.max_grad_norm) for o in optimizers]
            finite = all(map(math.isfinite, sums.values())) and all(map(math.isfinite, grad_norms))
            for optimizer, scheduler in zip(optimizers, schedulers):
                if finite and not skip:  # a non-finite loss or gradient never reaches the optimizer
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
            if nonfinite_in_a_row >= args.max_nonfinite_steps:
                raise FloatingPointError(f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient")
            for key, value in [*sums.items(), ("steps", 1), ("skipped", skip)] if finite else [("nonfinite", 1)]:
                totals[key] += value
    for model in trained:
        model.eval()
    steps, tokens = max(1, totals["steps"]), max(1.0, totals["tokens"])
    out = {"losses/policy_loss": totals["policy_loss"] / steps,
           "losses/kl": totals["kl"] / steps,  # k3 KL to the frozen reference, per response (the loss term)
           "losses/approx_kl": totals["approx_kl"] / tokens,  # pi_old -> pi, per token
           "losses/clipfrac": totals["clipped"] / tokens, "losses/skipped_minibatches": int(totals["skipped"]),
           "losses/nonfinite_steps": int(totals["nonfinite"]),  # skipped: a non-finite loss or gradient
           "losses/nonfinite_in_a_row": nonfinite_in_a_row}  # the streak at the end, carried to the next update
    if value_model is not None:
        out["losses/value_loss"] = totals["value_loss"] / steps
    return out


# ============================================================================================
# 6. The loop (the paper's Algorithm 1): sample, split, credit, update, log
# ============================================================================================
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plot" in argv:  # not a run: draw the curves of finished runs into one figure and stop
        return {"figure": plot_command(argv)}
    args = parse_args(argv)
    run = start_run(args)  # Part II: seeds, data, model, SFT warm-up, reference and critic, first evaluation
    with StopSignals(run, args) as stop:
        for iteration in tqdm(range(run.iteration + 1, args.iterations + 1), desc="RL iterations",
                              initial=run.iteration, total=args.iterations):
            record = {"iteration": iteration}
            with clock(record, "rollout"):  # 1. sample responses from pi_old, grade them, split them into steps
                indices = run.sampler.sample(range(len(run.train)), args.prompts_per_iteration)  # distinct problems
                episodes = sample_episodes(run.policy, run.tokenizer, run.train, rank_share(indices), args)
            with clock(record, "credit"):  # 2. credit assignment: MC values, the critic, or the group
                batch = collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes],
                                run.tokenizer.pad_token_id)
                fixed = precompute(run.policy, run.reference, run.value_model, batch, args, run.device)
                advantages, returns, stats = assign_credit(episodes, batch, fixed, run.policy, run.tokenizer,
                                                           run.train, args)
            with clock(record, "update"):  # 3. the PPO update, identical for every critic
                stats.update(ppo_update(run.policy, run.value_model, run.optimizers, run.schedulers, batch, fixed,
                                        advantages, returns, args, run.device, run.nonfinite_in_a_row))
            end_iteration(run, record, episodes, stats, args, stop)  # 4. log, evaluate, checkpoint (Part II)
    return finish_run(run, args)


# ############################################################################################
# PART II: NOT THE ALGORITHM. Everything a run needs that the paper does not describe: command-line
# checks, data and grading, models, SFT and evaluation, checkpoints and signals, the credit view and
# plots. A reader of Part I can stop here.
# ############################################################################################

# ============================================================================================
# Command line
# ============================================================================================
@dataclass
class Args(MethodArgs):
    """The run's options (not the algorithm). With Part I's `MethodArgs` they make every setting of a run."""

    # --- the run: seed, where it writes, resuming
    seed: int = 0
    """seed for python, torch and the task generator"""
    output_dir: str = ""
    """where metrics.jsonl and the final checkpoint go (default: runs/<task>-<critic>-seed<seed>)"""
    overwrite: bool = False
    """allow writing into an output directory that already holds a run"""
    save_every: int = 10
    """write <output-dir>/checkpoint.pt every this many iterations, after the pre-RL evaluation and at the end"""
    resume: str = ""
    """continue a stopped run: `--resume` alone reads <output-dir>/checkpoint.pt, `--resume FILE` that file"""

    # --- the machine: devices, processes, memory
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cpu', 'cuda' or 'mps'; under torchrun, one device per rank"""
    dist_timeout: int = 600
    """under torchrun: seconds a rank waits for the others before the run ends (a rank that died)"""
    rollout_batch_size: int = 256
    """most sequences in one `generate` call (the memory bound of the rollout phases)"""
    micro_batch_size: int = 16
    """responses per forward/backward pass; gradients accumulate up to a minibatch (memory only)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less GPU memory, slower updates"""
    offload_reference: bool = False
    """keep the frozen reference model on the CPU; it visits the GPU only to compute its log-probs"""
    max_nonfinite_steps: int = 3
    """stop the run when this many optimizer steps in a row had a non-finite loss or gradient"""

    # --- evaluation (paper: 16 samples per test problem at T=0.35, top_p 0.9) and the credit view
    eval_every: int = 10
    """evaluate every this many iterations (and always before RL and at the end)"""
    eval_problems: int = 0
    """held-out problems used for evaluation; 0 = all of them"""
    eval_train_problems: int = 0
    """also evaluate on this many training problems, the first ones (a fixed subset; the official code evaluates
    ~500): eval/train_pass@1, to read test against train accuracy (generalization); 0 = off"""
    eval_samples: int = 16
    """samples per held-out problem for pass@1 (paper: 16)"""
    eval_temperature: float = 0.35
    """sampling temperature of evaluation (paper: 0.35)"""
    show_credit: int = 0
    """at every evaluation, print this many of the iteration's responses step by step with V(s) and advantages"""

    # --- live dashboards (TRL's `report_to`; optional packages, imported only when chosen)
    report_to: str = "none"
    """send each iteration's metrics to 'trackio', 'wandb', 'tensorboard' or a comma-separated list; 'none' = off"""
    run_name: str = ""
    """the run's name in those dashboards (default: the output directory's name)"""

    # --- data: local files instead of the hub, and the built-in task
    dataset_path: str = ""
    """local data in the hub's fields instead of the hub: 'train.jsonl' or 'train.jsonl,test.jsonl'"""
    validation_size: int = -1
    """train problems held out for validation; -1 = the paper's (5% of GSM8K, 500 of MATH, at most 1/10)"""
    train_problems: int = 4000
    """size of the built-in task's training set"""
    test_problems: int = 500
    """size of the built-in task's held-out test set"""
    chain_length: str = "4-6"
    """built-in task: operations per problem, 'MIN-MAX' or 'N'"""
    slip_kinds: str = "mul,carry,borrow"
    """built-in task: the SFT tutor's slips (any of mul: 7*2=9, carry: 18+5=13, borrow: 13-5=12; '' = none)"""
    slip_rate: float = 0.3
    """built-in task: how often the tutor slips at a step that invites one of its slip kinds"""
    step_forms: int = 1
    """built-in task: the tutor writes each step in one of this many equivalent forms, drawn at random per step
    (harmless choices, which decide nothing): 1 = always 13-5=8; up to 4: 13 - 5 = 8, 8=13-5, 13 minus 5 is 8"""


# The embedded demo (`--model tiny`, the default) trains a 0.8M-parameter model from scratch on a CPU in
# minutes. These are the ONLY places where it departs from the paper's defaults (a flag typed still wins):
# 14 iterations; lr 5e-5, not 1e-6 (a tiny model needs a larger step); 32 prompts x 8 samples in minibatches
# of 128 (fewer, less noisy steps); K = 4 Monte Carlo rollouts, not 9 (the paper's K ablation: K = 3 is
# already close to 9); 80 new tokens (solutions are under 70); SFT from random weights for 650 steps of 64
# at lr 3e-3; evaluation on 256 held-out problems x 4 samples; and, for `--critic value`, the critic tuned on
# a small grid (README): its own lr 2e-3, trained alone on 8 iterations of the SFT policy's rollouts first.
TINY_DEMO_OVERRIDES = dict(iterations=14, prompts_per_iteration=32, samples_per_prompt=8, minibatch_size=128,
                           micro_batch_size=64, lr=5e-5, mc_rollouts=4, max_new_tokens=80, sft_lr=3e-3,
                           sft_epochs=10.4, sft_batch_size=64, eval_every=7, eval_problems=256, eval_samples=4,
                           value_lr=2e-3, critic_warmup=8)


@functools.cache  # parsing the source is slow and the answer never changes
def _field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the same trick tyro uses), for --help."""
    docs = {}
    for node, nxt in itertools.pairwise(ast.parse(inspect.getsource(cls)).body[0].body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def dataclass_parser(cls, description: str, *, alone: dict[str, str] | None = None, epilog: str = ""):
    """One flag per field of the dataclass `cls` (--field-name), its docstring as the help; a flag not
    typed stays out of the parsed namespace (SUPPRESS). `alone` maps fields whose flag may be given
    without a value to the value it then takes (`--resume` alone = 'latest'). compare_critics.py uses it too."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS, epilog=epilog)
    declared = {f.name: f for f in fields(cls)}
    layers = [k for k in reversed(cls.__mro__) if "__dataclass_fields__" in k.__dict__]  # Part I's knobs first
    for layer in layers:
        group = parser.add_argument_group(layer.__doc__.split(". ")[0]) if len(layers) > 1 else parser
        for name, doc in _field_docs(layer).items():
            f, flag, doc = declared[name], "--" + name.replace("_", "-"), doc.replace("%", "%%")  # argparse formats %
            if f.type == "bool":
                group.add_argument(flag, action="store_true", help=doc)
            elif name in (alone or {}):
                group.add_argument(flag, nargs="?", const=alone[name], metavar="FILE", help=doc)
            else:
                kind = {"int": int, "float": float, "str": str}[f.type]
                group.add_argument(flag, type=kind, metavar=name.upper(), help=f"{doc} (default: {f.default!r})")
    return parser


def parse_args(argv: list[str] | None = None) -> Args:
    """Build Args from the command line: dataclass defaults <- demo overrides (tiny model) <- flags."""
    parser = dataclass_parser(Args, __doc__.split("\n")[0], alone={"resume": "latest"},
                              epilog="python vineppo.py --plot RUN_DIR [RUN_DIR ...] [--output FILE] overlays "
                                     "the curves of finished runs (see --plot --help)")
    given = vars(parser.parse_args(argv))  # only the flags the user typed
    values = dict(TINY_DEMO_OVERRIDES) if given.get("model", Args.model) == "tiny" else {}
    values.update(given)
    args = Args(**values)
    args.model = resolve_model_name(args.model)
    if args.task == "auto":
        args.task = "arith" if args.model == "tiny" else "gsm8k"
    if args.iterations == -1:  # the paper's (official configs)
        args.iterations = 1000 if args.task == "math" else 650
    if not args.output_dir:
        args.output_dir = os.path.join("runs", f"{args.task}-{args.critic}-seed{args.seed}")
    if args.resume:
        args = resumed_args(args, given)
    check_args(args)
    return args


RESUME_MAY_CHANGE = ("resume", "output_dir", "iterations", "save_every", "eval_every", "device", "max_nonfinite_steps")


def resumed_args(args: Args, given: dict) -> Args:
    """A resumed run keeps the settings it was started with; only RESUME_MAY_CHANGE may be given again
    (raising --iterations stretches the learning-rate decay over the longer run)."""
    path = os.path.join(args.output_dir, "checkpoint.pt") if args.resume == "latest" else args.resume
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}; give --output-dir of the run to resume or --resume FILE")
    checkpoint = read_checkpoint(path)
    saved = checkpoint["args"]
    given = {**given, "model": resolve_model_name(given["model"])} if "model" in given else given  # as saved
    changed = [name for name, value in given.items() if name not in RESUME_MAY_CHANGE and value != saved.get(name)
               and not (name == "task" and value == "auto")]
    if changed:
        sys.exit(f"error: a resumed run keeps its settings; drop {', '.join('--' + n.replace('_', '-') for n in changed)} "
                 f"(only {', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE[2:])} may change)")
    resumed = Args(**{**saved, **{name: given[name] for name in RESUME_MAY_CHANGE if name in given}})
    if resumed.iterations < checkpoint["iteration"]:
        sys.exit(f"error: {path} was saved after iteration {checkpoint['iteration']}; resume it with --iterations "
                 f"{checkpoint['iteration']} or more")
    resumed.resume = path
    resumed.output_dir = given.get("output_dir", os.path.dirname(path) or ".")
    return resumed


def check_args(args: Args) -> None:
    """Refuse impossible settings with one line that says what to do."""
    problems = []
    for name, allowed in [("critic", ("mc", "value", "grpo", "rloo")), ("step_split", ("line", "tokens")),
                          ("task", ("arith", "gsm8k", "math")), ("device", ("auto", "cpu", "cuda", "mps"))]:
        if getattr(args, name) not in allowed:
            problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {getattr(args, name)!r}")
    if args.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        problems.append(f"--model {args.model}: no such directory (give a local checkpoint directory or a hub id)")
    if args.task == "arith" and args.dataset_path:
        problems.append("--dataset-path needs --task gsm8k or --task math (the arith task is generated)")
    try:
        parse_chain_length(args.chain_length)
    except ValueError:
        problems.append(f"--chain-length must be N or MIN-MAX with 1 <= MIN <= MAX, like 4-6; got {args.chain_length!r}")
    if set(args.slip_kinds.split(",")) - {"", *SLIP_KINDS}:
        problems.append(f"--slip-kinds takes a comma-separated subset of {','.join(SLIP_KINDS)}; got {args.slip_kinds!r}")
    if not 0 <= args.slip_rate <= 1:
        problems.append(f"--slip-rate must be in [0, 1], got {args.slip_rate}")
    if not 1 <= args.step_forms <= len(STEP_FORMS):
        problems.append(f"--step-forms must be 1 to {len(STEP_FORMS)}, got {args.step_forms}")
    if args.validation_size < -1:
        problems.append(f"--validation-size must be -1 (paper default) or at least 0, got {args.validation_size}")
    if min(args.iterations, args.show_credit, args.critic_warmup) < 0 or args.max_states_per_response < -1:
        problems.append("--iterations, --show-credit, --critic-warmup and --max-states-per-response (-1: the "
                        "official's, 0: all) cannot be negative")
    for name in ("mc_rollouts", "step_chunk_tokens", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens",
                 "rollout_batch_size", "epochs", "minibatch_size", "micro_batch_size",
                 "sft_batch_size", "eval_every", "eval_samples", "train_problems", "test_problems",
                 "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.value_lr > 0 or args.value_lr == -1):
        problems.append(f"--value-lr must be positive or -1 (the policy's --lr), got {args.value_lr}")
    for name in ("lr", "temperature", "eval_temperature"):
        if not getattr(args, name) > 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if min(args.sft_epochs, args.kl_coef, args.eval_problems, args.eval_train_problems, args.save_every) < 0:
        problems.append("--sft-epochs, --kl-coef, --eval-problems, --eval-train-problems and --save-every cannot be "
                        "negative")
    if args.minibatch_size > args.prompts_per_iteration * args.samples_per_prompt:
        problems.append(f"--minibatch-size {args.minibatch_size} is larger than the batch of "
                        f"{args.prompts_per_iteration * args.samples_per_prompt} responses per iteration")
    for tracker in set(args.report_to.split(",")) - {"none"}:
        if tracker not in TRACKERS:
            problems.append(f"--report-to takes none or a comma-separated list of {', '.join(TRACKERS)}; got {tracker!r}")
        elif importlib.util.find_spec(tracker) is None:
            problems.append(f"--report-to {tracker} needs the {tracker} package: pip install {tracker}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun every rank samples problems of its own
    if args.prompts_per_iteration < world:
        problems.append(f"--prompts-per-iteration {args.prompts_per_iteration} is fewer than the {world} ranks "
                        f"torchrun started: give at least one problem per rank, or start fewer ranks")
    if problems:
        sys.exit("error: " + "; ".join(problems))


# ============================================================================================
# Tasks: problems, the prompt, grading
# ============================================================================================
PROMPT_TEMPLATE = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"  # the paper's prompt, no few-shot


def make_prompt(problem: str) -> str:
    return PROMPT_TEMPLATE.format(problem=problem)


def make_sft_target(solution: str) -> str:
    """The SFT target of the paper: the model answers from a newline, "\\n{solution}\\n" (+ EOS)."""
    return "\n" + solution + "\n"


OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
SLIP_KINDS = ("mul", "carry", "borrow")  # the built-in task's tutor's habits, see `slipped_result`


def slip_kind(value: int, sign: str, operand: int) -> str | None:
    """The kind of slip a step invites, or None: every multiplication ('mul'), an addition whose units
    carry ('carry': 18+5), a subtraction whose units borrow ('borrow': 13-5)."""
    if sign == "*":
        return "mul"
    if sign == "+" and value % 10 + operand >= 10:
        return "carry"
    if sign == "-" and value >= 10 and value % 10 < operand:
        return "borrow"
    return None


def slipped_result(value: int, sign: str, operand: int) -> int:
    """What the sloppy tutor writes at a step it gets wrong: adds where it should multiply (7*2=9), forgets
    the carry (18+5=13), or takes the smaller units digit from the larger (13-5=12, the classic borrow bug).

    >>> [slipped_result(7, "*", 2), slipped_result(18, "+", 5), slipped_result(13, "-", 5)]
    [9, 13, 12]
    """
    if sign == "*":
        return value + operand
    if sign == "+":
        return value + operand - 10
    return value - value % 10 + abs(value % 10 - operand)


# The equivalent ways to write a step (`--step-forms`): the first is the task's; the others say the same.
WORDS = {"+": "plus", "-": "minus", "*": "times"}
STEP_FORMS = ["{a}{sign}{b}={c}", "{a} {sign} {b} = {c}", "{c}={a}{sign}{b}", "{a} {word} {b} is {c}"]


def solve_chain(start: int, ops: list[tuple[str, int]], slips=None, form=None) -> tuple[str, int]:
    """Write the solution of a chain, one step per line, then '#### answer'. `slips(kind)`, asked at each
    step that invites a slip (`slip_kind`, on the value written so far), says whether the writer slips
    there (`slipped_result`); the wrong value is carried on. `form()`, asked at each step, picks its
    `STEP_FORMS` entry (none: the first).

    >>> solve_chain(3, [("+", 4), ("*", 2)])
    ('3+4=7\\n7*2=14\\n#### 14', 14)
    >>> solve_chain(3, [("+", 4), ("*", 2)], slips=lambda kind: kind == "mul")
    ('3+4=7\\n7*2=9\\n#### 9', 9)
    """
    value, lines = start, []
    for sign, operand in ops:
        kind = slip_kind(value, sign, operand)
        if kind and slips and slips(kind):
            result = slipped_result(value, sign, operand)
        else:
            result = OPERATIONS[sign](value, operand)
        lines.append(STEP_FORMS[form() if form else 0].format(a=value, sign=sign, b=operand, c=result, word=WORDS[sign]))
        value = result
    return "\n".join(lines) + f"\n#### {value}", value


def make_arith_problem(rng: random.Random, min_steps: int = 4, max_steps: int = 6) -> dict:
    """One problem of the built-in task: a chain of min_steps to max_steps operations; every value stays
    in 1..50, operands are single digits, and a product stays at most 50.

    >>> make_arith_problem(random.Random(0))["problem"]
    'Start at 13: -5, *4, +4, +5, +5.'
    """
    start = value = rng.randint(1, 19)
    ops = []
    for _ in range(rng.randint(min_steps, max_steps)):
        options = []
        if value <= 49:
            options.append(("+", rng.randint(1, min(9, 50 - value))))
        if value >= 2:
            options.append(("-", rng.randint(1, min(9, value - 1))))
        if value <= 25:
            options.append(("*", rng.randint(2, min(9, 50 // value))))
        sign, operand = rng.choice(options)
        ops.append((sign, operand))
        value = OPERATIONS[sign](value, operand)
    solution, answer = solve_chain(start, ops)
    problem = f"Start at {start}: " + ", ".join(f"{sign}{operand}" for sign, operand in ops) + "."
    return {"problem": problem, "solution": solution, "answer": str(answer), "ops": ops, "start": start}


def parse_chain_length(text: str) -> tuple[int, int]:
    """'4-6' -> (4, 6); '5' -> (5, 5). ValueError on anything else."""
    low, _, high = text.partition("-")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise ValueError(text)
    return low, high


def tutor_slips(tutor: random.Random, kinds: set[str], rate: float, kind: str) -> bool:
    """Whether the sloppy tutor slips at a step of this kind (only the kinds it is prone to)."""
    return kind in kinds and tutor.random() < rate


def make_arith_task(seed: int, n_train: int, n_test: int, slip_rate: float, chain_length: str = "4-6",
                    slip_kinds: str = "mul,carry,borrow", step_forms: int = 1) -> tuple[list[dict], list[dict]]:
    """Deterministic train and test sets that never share a problem (a hash of the text picks the side).

    The training solutions were written by a sloppy tutor: at each step that invites one of `slip_kinds`
    (`slip_kind`), with probability `slip_rate`, the tutor slips (`slipped_result`) and carries the error
    to a wrong final answer. SFT copies those habits; the reward (the TRUE answer, always) punishes them;
    and the blame belongs to one step of an otherwise right chain: the step credit assignment has to
    find. Test solutions are right. With `step_forms` > 1 the tutor writes each training step in one of that
    many `STEP_FORMS`, drawn from a stream of its own (so the problems and slips are those of step_forms 1).
    """
    tutor, writer = random.Random(seed + 1), random.Random(seed + 2)
    kinds = set(slip_kinds.split(",")) - {""}
    train_chains, test_chains = arith_chains(seed, n_train, n_test, chain_length)
    train = []
    for item in train_chains:  # the tutor writes the training solutions, in order
        slips = functools.partial(tutor_slips, tutor, kinds, slip_rate)
        form = functools.partial(writer.randrange, step_forms) if step_forms > 1 else None
        train.append({**item, "solution": solve_chain(item["start"], item["ops"], slips, form)[0]})
    return train, [dict(item) for item in test_chains]


@functools.lru_cache(maxsize=8)
def arith_chains(seed: int, n_train: int, n_test: int, chain_length: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """`make_arith_task`'s problems with right solutions: they do not depend on the tutor, so they are drawn
    once (cached: a search over slip rates, `compare_critics.matched_slip_rate`, asks for the same ones often)."""
    rng, (low, high) = random.Random(seed), parse_chain_length(chain_length)
    train, test, seen = [], [], set()
    for _ in range(100 * (n_train + n_test)):
        if len(train) >= n_train and len(test) >= n_test:
            break
        item = make_arith_problem(rng, low, high)
        if item["problem"] in seen:
            continue
        seen.add(item["problem"])
        side = test if zlib.crc32(item["problem"].encode()) % 8 == 0 else train
        if len(side) < (n_test if side is test else n_train):
            side.append(item)
    if len(train) < n_train or len(test) < n_test:
        sys.exit(f"error: the built-in task has only {len(train)} train / {len(test)} test problems; ask for fewer")
    return tuple(train), tuple(test)


# --- real datasets: every task yields dicts with "problem", "solution" (the SFT target) and "answer"
MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus"]
HUB_DATASETS = {  # task -> (train sources, test sources), each a `datasets.load_dataset` call
    "gsm8k": ([dict(path="openai/gsm8k", name="main", split="train")],  # 7,473 train / 1,319 test
              [dict(path="openai/gsm8k", name="main", split="test")]),
    # MATH train as in the paper (the PRM800K split): all 12,500 MATH problems minus the 500 of MATH500
    "math": ([dict(path="EleutherAI/hendrycks_math", name=subject, split="train+test") for subject in MATH_SUBJECTS],
             [dict(path="HuggingFaceH4/MATH-500", split="test")]),
}


def to_problem(task: str, row: dict) -> dict:
    """One dataset row in the hub's fields -> {problem, solution, answer}. GSM8K rows: question, answer
    (worked solution ending '#### N'); the <<48/2=24>> calculator annotations are removed from the SFT
    target (paper). MATH rows: problem, solution, optional answer (else the solution's final \\boxed{})."""
    text = {key: "" if value is None else str(value) for key, value in row.items()}  # a null field is empty
    if task == "gsm8k":
        solution = re.sub(r"<<[^<>]*>>", "", text["answer"])
        return {"problem": text["question"].strip(), "solution": solution, "answer": extract_gsm8k_answer(solution)}
    boxed = last_boxed(text["solution"]) and math_final_answer(text["solution"])  # boxes joined, as the official code
    return {"problem": text["problem"], "solution": text["solution"], "answer": text.get("answer") or boxed}


def load_problems(task: str, sources: list[dict]) -> list[dict]:
    """Hub sets and local JSONL files take the same path: `load_dataset`, then `to_problem`. Rows without
    a gold answer are skipped (and counted): a reference without a final answer cannot grade anything."""
    from datasets import load_dataset
    fields_needed = "question, answer" if task == "gsm8k" else "problem, solution"
    problems = []
    for source in sources:
        local = source.get("data_files")
        if local and not os.path.isfile(local):
            sys.exit(f"error: --dataset-path {local}: no such file")
        if local and os.path.getsize(local) == 0:
            sys.exit(f"error: --dataset-path {local} is empty; it needs one JSON object per line with {fields_needed}")
        try:
            rows = load_dataset(**source)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; each gets one line
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            if local:
                sys.exit(f"error: could not read {local} as JSON lines ({reason}); write one JSON object per line "
                         f"with the fields {fields_needed}")
            sys.exit(f"error: could not load {source['path']} ({reason}); give a local copy with --dataset-path "
                     f"train.jsonl,test.jsonl or set HF_HUB_OFFLINE=1 with the dataset in your hub cache")
        try:
            loaded = [to_problem(task, row) for row in rows]
        except KeyError as missing:
            sys.exit(f"error: rows of {local or source['path']} lack the field {missing}; --task {task} needs {fields_needed}")
        graded = [p for p in loaded if p["answer"] and p["problem"]]
        if len(graded) < len(loaded):
            print(f"skipped {len(loaded) - len(graded)} of {len(loaded)} rows of {local or source['path']} "
                  f"without a problem or a gold final answer")
        if not graded:
            sys.exit(f"error: {local or source['path']} has no row with a problem and a gold final answer; "
                     f"--task {task} needs {fields_needed}")
        problems += graded
    return problems


def load_task(args: Args) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test). Validation is held out of train (never trained on) by a fixed shuffle
    that does not depend on --seed; without a local test file it doubles as the test set."""
    if args.task == "arith":
        train, test = make_arith_task(args.seed, args.train_problems, args.test_problems, args.slip_rate,
                                      args.chain_length, args.slip_kinds, args.step_forms)
        return train, [], test
    if args.dataset_path:
        train_file, _, test_file = args.dataset_path.partition(",")
        train_sources = [dict(path="json", data_files=train_file, split="train")]
        test_sources = [dict(path="json", data_files=test_file, split="train")] if test_file else []
    else:
        train_sources, test_sources = HUB_DATASETS[args.task]
    train, test = load_problems(args.task, train_sources), load_problems(args.task, test_sources)
    if args.task == "math" and not args.dataset_path:
        test_problems = {p["problem"] for p in test}
        train = [p for p in train if p["problem"] not in test_problems]  # 12,500 - MATH500 = 12,000
    n_val = args.validation_size
    if n_val == -1:  # the paper's: about 370 of GSM8K's 7,473; 500 of MATH's 12,000
        n_val = min(round(0.05 * len(train)) if args.task == "gsm8k" else 500, len(train) // 10)
    order = random.Random(0).sample(range(len(train)), len(train))
    validation, train = [train[i] for i in order[:n_val]], [train[i] for i in sorted(order[n_val:])]
    if not train or not (test or validation):
        sys.exit(f"error: {len(train)} train / {len(validation)} validation / {len(test)} test problems: "
                 f"--task {args.task} needs train problems and a test file or a validation split")
    return train, validation, test or validation


# --- GSM8K grading: the official exact match
def extract_gsm8k_answer(text: str) -> str | None:
    """The official GSM8K answer (official code: tasks/gsm8k.py): ALL the text after the last '####',
    stripped, commas removed, lower-cased; None if there is none. Reads the gold from dataset solutions too.

    >>> extract_gsm8k_answer("48/2 = 24\\n#### 1,234 ")
    '1234'
    """
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "").lower() or None


def grade_gsm8k(text: str, gold: str) -> float:
    """Reward 1.0 if the final answer equals the gold (commas removed, lower-cased) as a string, as the
    official grader does: so "18.0", "$18" and "18\\nThe end." all differ from "18"."""
    return float(extract_gsm8k_answer(text) == gold.strip().replace(",", "").lower())


# --- MATH grading: the final answer read as the official grader reads it, compared by math-verify
def read_box(text: str, start: int) -> tuple[str | None, int]:
    """(content, end) of the \\boxed{...} or \\fbox{...} at `start`, braces matched ('\\boxed 5$' runs to
    the next $); (None, len(text)) if it never closes."""
    i = start + len("\\fbox" if text.startswith("\\fbox", start) else "\\boxed")
    if text.startswith(" ", i):
        end = text.find("$", i) % (len(text) + 1)  # no $ (-1) -> the end of the text
        return text[i:end].strip() or None, end
    depth = 0
    for j in range(i, len(text) if text.startswith("{", i) else i):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j] or None, j + 1
    return None, len(text)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}); None if absent or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return read_box(text, start)[0] if start >= 0 else None


BOX_GAP = r"(?:[\s$]|\\[()\[\]])*"  # spaces and math delimiters: $ \( \) \[ \]
BOX_JOINER = re.compile(rf"{BOX_GAP}(?:,|and|or|\\text\{{\s*(?:and|or)\s*\}})?{BOX_GAP}(?:[a-zA-Z]\s*=\s*)?")


def math_final_answer(text: str) -> str | None:
    """The final answer (official code: tasks/math_answer_exctraction.py): the last \\boxed{}, with the
    boxes before it that only ',', 'and', 'or' or 'x =' join; with no box, what follows the last
    'answer is' ($..$ math, else the rest of the line); else the last number. An unclosed box is no answer.

    >>> math_final_answer("so $x = \\\\boxed{-3}$ or $x = \\\\boxed{2}$."), math_final_answer("1, then 2,000.")
    ('-3, 2', '2000')
    """
    starts = [match.start() for match in re.finditer(r"\\boxed|\\fbox", text)]
    if starts:
        answers, following = [], len(text)
        for start in reversed(starts):
            content, end = read_box(text, start)
            if answers and not (end <= following and BOX_JOINER.fullmatch(text, end, following)):
                break
            answers, following = [content] + answers, start
        return None if None in answers else ", ".join(answers)
    if "answer is" in text:
        rest = text.rsplit("answer is", 1)[1].strip()
        math = re.match(r"\$+([^$]+)\$", rest)
        return (math[1] if math else rest.split("\n")[0]).strip(" .:") or None
    numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
    return numbers[-1] if numbers else None


@functools.lru_cache(maxsize=10_000)
def _parse_math(s: str) -> list:
    """math-verify's parse, cached in the grading process. '25\\%' reads as 25; a word ('ab') or a clock
    time ('12:30') is text, not a product or a ratio."""
    from math_verify import parse
    return parse("$" + re.sub(r"^\s*([A-Za-z]{2,}|\d+(?::\d+)+)\s*$", r"\\text{\1}", re.sub(r"\\?%", "", s)) + "$")


def _math_verify_worker(answer: str, gold: str) -> bool:
    """math-verify's check, in the grading process; a set is never a tuple or an interval ('2, 1' != (1, 2))."""
    from math_verify import verify
    from sympy import FiniteSet, Interval, Tuple
    gold_parsed, answer_parsed = _parse_math(gold), _parse_math(answer)
    kinds = {"set" if isinstance(p[0], FiniteSet) else "pair" if isinstance(p[0], (Interval, Tuple)) else ""
             for p in (gold_parsed, answer_parsed) if p}
    return kinds != {"set", "pair"} and verify(gold_parsed, answer_parsed, float_rounding=10, allow_set_relation_comp=True)


MATH_TIMEOUT_S = 5.0
_math_pool = None


@functools.lru_cache(maxsize=100_000)
def math_equal(answer: str, gold: str) -> bool:
    """Cached math-verify check in a worker process with a time limit: 9^{9^{9}} blocks in C code, where no
    signal stops it, so on timeout the worker is killed (the next call starts a fresh one) and TimeoutError
    is raised, which the cache does not keep."""
    global _math_pool
    if _math_pool is None:
        try:
            import math_verify  # noqa: F401 - loaded before the fork: no worker spends its time limit importing it
        except ImportError:
            sys.exit("error: MATH answers are checked by math-verify; install it: pip install -r requirements.txt")
        start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        # the worker ignores Ctrl-C (the main process finishes its iteration); SIGTERM still kills it on a timeout
        _math_pool = multiprocessing.get_context(start).Pool(1, signal.signal, (signal.SIGINT, signal.SIG_IGN))
        atexit.register(_math_pool.terminate)
    try:
        return _math_pool.apply_async(_math_verify_worker, (answer, gold)).get(MATH_TIMEOUT_S)
    except multiprocessing.TimeoutError:
        _math_pool.terminate()
        _math_pool = None
        raise TimeoutError(f"math-verify took over {MATH_TIMEOUT_S} s") from None


def grade_math(text: str, gold: str) -> float:
    """Reward 1.0 if the final answer is equivalent to the gold answer (paper), else 0 (also on a timeout)."""
    try:
        return float((answer := math_final_answer(text)) is not None and math_equal(answer, gold))
    except TimeoutError:
        return 0.0


def grade(task: str, text: str, gold: str) -> float:
    """The task's reward: the MATH grader for 'math', the GSM8K grader for 'gsm8k' and the built-in task."""
    return grade_math(text, gold) if task == "math" else grade_gsm8k(text, gold)


def reward_of(task: str, text: str, ended: bool, answer: str) -> float:
    """R = 1 if the final answer is right, else 0; a response cut by the length limit (no EOS) gets 0."""
    return grade(task, text, answer) if ended else 0.0


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text; special tokens (EOS, pad) dropped, nothing else changed."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --- MATH's step rule (Part I's split_response uses it)
# MATH regions as the official splitter finds them (official code: tasks/math_extract_steps_inplace.py):
# [asy]..[/asy], \(..\), \[..\], $$..$$, $..$ (not \$), \begin{env}..\end{env}; an unclosed one is plain text.
MATH_REGION = re.compile(r"\[asy\].*?\[/asy\]|\\\(.*?\\\)|\\\[.*?\\\]|\$\$.*?\$\$|(?<!\\)\$.*?[^\\]\$(?!\$)"
                         r"|\\begin\{([^}]*)\}.*?\\end\{\1\}", re.DOTALL)
SENTENCE_END = re.compile(r"\.(?<!\b[A-Za-z]\.)(?<!\s[A-Za-z]{2}\.)(?=\s+[A-Z])")  # not after "e.g." or "so."
MATH_PERIOD = (".$", ".$$", ".\\)", ".\\]")  # math that ends with its own period: "$x = 2.$"
LONE_OPENING = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")
PROSE_CUTS = [",", r"\sand(?=\s)", ":", r"\sto(?=\s)"]  # cut after these, outside math; both halves >= 40 chars
MATH_CUTS = [r",\$", r",\\\)", r",\\\]", "=", r"\\equiv", r"\+", r"\\cancelto"]  # cut after these; halves >= 20


def hide_math(text: str) -> str:
    """The text with every math region overwritten by '#' (same length), so prose rules cannot see into it."""
    return MATH_REGION.sub(lambda match: "#" * len(match.group()), text)


def merge_small(text: str, bounds: list[int], small) -> list[int]:
    """Drop the boundary after each piece text[a:b] that is small(); a small last piece joins the one before."""
    kept = [0]
    for bound in sorted(set(bounds) - {0, len(text)}):
        if not small(text[kept[-1]:bound]):
            kept.append(bound)
    if len(kept) > 1 and small(text[kept[-1]:]):
        kept.pop()
    return kept + [len(text)]


def break_long(piece: str, max_chars: int) -> list[str]:
    """Halve a piece over max_chars, then its halves: at the prose cut nearest the middle (both halves >= 40
    characters), else at the math cut nearest the middle (both >= 20), trying the patterns in order. As in
    the official code, prose positions count each math region as 60 characters (its placeholder there)."""
    if len(piece) <= max_chars:
        return [piece]
    regions = list(MATH_REGION.finditer(piece))

    def placeholder_position(i: int) -> int:
        return i - sum(len(region.group()) - 60 for region in regions if region.end() <= i)

    for searched, patterns, min_half, position in ((hide_math(piece), PROSE_CUTS, 40, placeholder_position),
                                                   (piece, MATH_CUTS, 20, lambda i: i)):
        middle = position(len(piece)) / 2
        for pattern in patterns:
            cuts = [match.end() for match in re.finditer(pattern, searched)]
            cut = min(cuts, key=lambda c: abs(position(c) - middle), default=0)
            if min(cut, len(piece) - cut) >= min_half:
                return break_long(piece[:cut], max_chars) + break_long(piece[cut:], max_chars)
    return [piece]


def split_math_steps(text: str, min_chars: int = 20, max_chars: int = 100) -> list[str]:
    """Split a MATH-style response into steps on its text, by the official rule (official code:
    tasks/math_extract_steps_inplace.py); the steps re-join to the text exactly.

    1. Cut before each newline and after each sentence end ('.', spaces, capital letter) outside math.
       A piece under min_chars characters without math joins the next one unless it ends with '.'.
    2. Cut after math that ends with its own period ("$x = 2.$"). Now a piece under min_chars characters
       joins the next one (the last one the one before) unless it ends with such math.
    3. Cut before each newline inside math (the lines of an align*); a piece that is a lone opening
       ("$$", "\\begin{align*}") or under 3 characters joins the next one.
    4. Halve pieces over max_chars (`break_long`).

    >>> steps = split_math_steps("We factor: \\\\begin{align*}\\nx^2 - 1 &= (x - 1)(x + 1)\\n\\\\end{align*}\\n"
    ...                          "The roots are $1$ and $-1$. Their sum is $\\\\boxed{0}$.")
    >>> for step in steps: print(repr(step))
    'We factor: \\\\begin{align*}'
    '\\nx^2 - 1 &= (x - 1)(x + 1)'
    '\\n\\\\end{align*}'
    '\\nThe roots are $1$ and $-1$.'
    ' Their sum is $\\\\boxed{0}$.'
    """
    masked = hide_math(text)
    bounds = [i for i, char in enumerate(masked) if char == "\n"]
    bounds += [match.end() for match in SENTENCE_END.finditer(masked)]
    bounds = merge_small(text, bounds, lambda piece: len(piece) < min_chars and not piece.endswith(".")
                         and not MATH_REGION.search(piece))
    bounds += [match.end() for match in MATH_REGION.finditer(text) if match.group().endswith(MATH_PERIOD)]
    bounds = merge_small(text, bounds, lambda piece: len(piece) < min_chars and not piece.endswith(MATH_PERIOD))
    bounds += [i for i, char in enumerate(text) if char == "\n" and masked[i] == "#"]
    bounds = merge_small(text, bounds, lambda piece: len(piece) < 3 or LONE_OPENING.fullmatch(piece.strip()))
    steps = [step for a, b in zip(bounds, bounds[1:]) for step in break_long(text[a:b], max_chars)]
    assert "".join(steps) == text and steps, "steps must re-join to the response"
    return steps


# ============================================================================================
# Batching for generate and the update: padding, slicing, a generation config that cannot leak, shared prefill
# ============================================================================================
@contextmanager
def library_generation_defaults(model):
    """The library's defaults as the model's own generation config for the duration, restored after: `generate`
    fills every field a GenerationConfig leaves unset from the model's (a checkpoint's saved repetition_penalty,
    no_repeat_ngram_size, ...), which would change the distribution the samples come from."""
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def shared_prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The KV cache of each row's prompt but its last token, computed ONCE per distinct prompt and copied to
    the rows that repeat it (the K rollouts of one MC state, the samples of one problem): given it, `generate`
    runs only the last prompt token and the new ones, so K copies pay one prefill instead of K. Rows never
    mix and the random stream is untouched, so the samples are the ones `generate` draws without it, up to
    float rounding (the last prompt token runs as a one-token step: its logits move by ~1e-7, a test checks).
    None when no row repeats another: nothing to save.

    input_ids, attention_mask: [rows, width], left-padded, on the model's device.
    """
    width = input_ids.shape[1]
    distinct, row_of = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(input_ids) or width < 2:
        return None
    ids, mask = distinct.split(width, dim=1)  # [distinct, width] each
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # numbered as `generate` numbers padded rows
    cache = getattr(model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                          use_cache=True, logits_to_keep=1), CACHE_NAME)  # [distinct, heads, width - 1, head_dim] per layer
    cache.batch_select_indices(row_of)  # [rows, ...]: every row gets the keys and values of its own prompt
    return cache


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids and attention_mask [rows, longest], padded on the LEFT (as `generate` wants)."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # [rows, width]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [rows, width]
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def right_aligned(rows: list[list[float]], width: int) -> torch.Tensor:
    """Lists of per-response-token numbers -> [B, width], right-aligned like collate's responses."""
    out = torch.zeros((len(rows), width))
    for b, row in enumerate(rows):
        if row:
            out[b, width - len(row):] = torch.tensor(row, dtype=torch.float)
    return out


def slice_batch(batch: dict, rows: torch.Tensor, device) -> dict:
    """The given rows of a collated batch, with the all-padding left columns cut off."""
    mask = batch["response_mask"][rows]
    seq_width = int(batch["attention_mask"][rows].sum(-1).max())
    resp_width = int(mask.sum(-1).max())
    out = {key: batch[key][rows][:, -seq_width:].to(device) for key in ("input_ids", "attention_mask", "position_ids")}
    out["response_mask"] = mask[:, -resp_width:].to(device)
    return out


# ============================================================================================
# Models and tokenizers
# ============================================================================================
# requirements.txt allows transformers from 4.51 to the newest, which spell two keywords differently: the code
# tells the versions apart here only (and enable_gradient_checkpointing looks its method up by name).
TRANSFORMERS_VERSION = Version(transformers_version)
FROM_PRETRAINED_DTYPE_KWARG = "dtype" if TRANSFORMERS_VERSION >= Version("4.56") else "torch_dtype"  # renamed in 4.56
CACHE_NAME = "cache" if TRANSFORMERS_VERSION >= Version("5.24") else "past_key_values"  # generate's keyword, outputs' field


def build_tiny_tokenizer():
    """A tokenizer built locally (no download): a byte-level BPE with NO merges, so every ASCII character
    is one token, plus <pad>, <eos> and the prompt's words '[MATH_TASK]', ' Problem:', 'Solution:' as one
    token each (short prompts keep the CPU demo fast). It is the same kind of tokenizer as Qwen2's (which
    `AutoTokenizer` rebuilds for any qwen2 checkpoint), so a saved run reloads with identical ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):  # 256 printable stand-ins, one per byte
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        padding_side="left", clean_up_tokenization_spaces=False,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_tokens(["[MATH_TASK]", " Problem:", "Solution:"])
    return tokenizer


def build_tiny_model(tokenizer, seed: int):
    """A ~0.7M-parameter Qwen2-style model with random weights, built from a config (no download)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# Short names a user types -> hub organisations (`--model Qwen2.5-0.5B` means Qwen/Qwen2.5-0.5B).
MODEL_ORGS = {"qwen": "Qwen", "llama-": "meta-llama", "meta-llama": "meta-llama", "codellama": "meta-llama",
              "gemma": "google", "mistral": "mistralai", "mixtral": "mistralai", "phi-": "microsoft",
              "rho-math": "microsoft", "rho-1b-sft": "realtreetune", "rho-7b-sft": "realtreetune",
              "deepseek": "deepseek-ai", "smollm": "HuggingFaceTB", "tinyllama": "TinyLlama", "olmo": "allenai",
              "pythia": "EleutherAI", "gpt-neo": "EleutherAI", "opt-": "facebook", "falcon": "tiiuae"}


def resolve_model_name(name: str) -> str:
    """'tiny', a local directory and an 'org/name' id stay as they are; a short name of a known family
    gets its organisation; anything else (e.g. 'gpt2', an id without organisation) stays as it is.

    >>> resolve_model_name("Qwen2.5-0.5B"), resolve_model_name("rho-1b-sft-GSM8K")
    ('Qwen/Qwen2.5-0.5B', 'realtreetune/rho-1b-sft-GSM8K')
    """
    if name == "tiny" or "/" in name or os.path.isdir(name):
        return name
    org = next((org for prefix, org in MODEL_ORGS.items() if name.lower().startswith(prefix)), None)
    return f"{org}/{name}" if org else name


def check_hub_reachable(args: Args, timeout_s: float = 5.0) -> None:
    """Fail in seconds with one clear line when the hub is needed and unreachable (a bare `from_pretrained`
    retries for ~46 s, `load_dataset` ~23 s, then raise). Needed for a model that is not a local directory
    and for a real task without --dataset-path; not with HF_HUB_OFFLINE=1 (the cache is used instead)."""
    from huggingface_hub import constants
    needs = [f"--model {args.model}"] if args.model != "tiny" and not os.path.isdir(args.model) else []
    needs += [f"the {args.task} dataset"] if args.task != "arith" and not args.dataset_path else []
    if not needs or constants.HF_HUB_OFFLINE:
        return
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        pass  # the hub answered: it is reachable (an error status is for from_pretrained to explain)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        sys.exit(f"error: cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) for {' and '.join(needs)}; "
                 f"point at local copies (--model DIR, --dataset-path train.jsonl,test.jsonl) or set HF_HUB_OFFLINE=1 "
                 f"to use models and datasets already in your hub cache")


def load_model_and_tokenizer(args: Args, device):
    """The tiny demo model, or any causal LM by hub id / local path through `from_pretrained`. A tokenizer
    without EOS gets one (SFT teaches it); without a pad token, EOS pads (left padding is masked). Only
    EOS and pad get a new embedding row if they lack one: a saved demo model reloads with Qwen2's tokenizer,
    which adds an unk token the model never sees, and a new random row would change the saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, args.seed)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
            fp32 = {FROM_PRETRAINED_DTYPE_KWARG: torch.float32}  # fp32 master weights
            model = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
        except (OSError, ValueError) as error:
            sys.exit(f"error: could not load --model {args.model!r} ({first_line(error)}). Give a hub id "
                     f"you can reach, a local directory, or set HF_HUB_OFFLINE=1 to use the local cache.")
        if tokenizer.eos_token_id is None:
            tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if max(tokenizer.eos_token_id, tokenizer.pad_token_id) >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))  # SFT teaches EOS: it needs an embedding row
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.to(device).eval(), tokenizer  # eval(): dropout stays off (paper)


def enable_gradient_checkpointing(model) -> None:
    """Checkpointing in transformers only runs in train() mode, so the updates switch to train() while
    it is on; every dropout is zeroed first, so that switch changes nothing else (paper: dropout off)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def encode_prompts(tokenizer, problems: list[str]) -> list[list[int]]:
    """Token ids of the paper's prompt for each problem, with the tokenizer's BOS if it adds one; never an EOS
    at the end (some tokenizers append one, which would end the response before it starts). One call for
    all: a fast tokenizer encodes a list at once (4,500 prompts: 0.2 s against 0.46 s one by one)."""
    prompts = []
    for ids in tokenizer([make_prompt(problem) for problem in problems])["input_ids"] if problems else []:
        while ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        prompts.append(ids)
    return prompts


def encode_prompt(tokenizer, problem: str) -> list[int]:
    return encode_prompts(tokenizer, [problem])[0]


def check_prompt_lengths(model, tokenizer, problems: list[dict], args: Args) -> None:
    """A prompt plus max_new_tokens must fit in the model's context; say so before any work is done."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, encode_prompts(tokenizer, [p["problem"] for p in problems])))
    if context and longest + args.max_new_tokens > context:
        sys.exit(f"error: the longest prompt has {longest} tokens, and with --max-new-tokens {args.max_new_tokens} "
                 f"it exceeds the model's context of {context} tokens; lower --max-new-tokens or drop the long problems")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is visible to torch; use --device cpu or --device auto")
    return torch.device(name)


BF16_ON_CPU = False  # tests/rehearse_gpu_path.py sets it: the CUDA precision path, rehearsed on a CPU


def autocast(device: torch.device):
    """bf16 mixed precision for forward passes on CUDA; exact fp32 elsewhere. Weights stay fp32 (a bf16
    weight cannot hold an lr=1e-6 step: it would round away)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or BF16_ON_CPU)


# Architectures whose causal-LM forward is `lm_head(last hidden states)` and nothing more (no logit soft-capping or
# scaling), so the LM head can run on chunks of positions; any other model gets its logits from its own forward.
PLAIN_LM_HEADS = ("qwen2", "qwen3", "llama", "mistral")
LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of positions (the whole micro-batch's rows)


def logits_in_chunks(model, mb: dict, targets: torch.Tensor, reduce) -> torch.Tensor:
    """reduce(logits, targets) -> [B, t] over the response positions, a chunk of positions at a time: the
    backbone runs once, the LM head on the hidden states of each chunk inside `torch.utils.checkpoint`, so the
    forward keeps one chunk's logits at a time and the backward recomputes them; what autograd keeps is the
    hidden states [B, T, hidden]. The numbers are those of the full logits up to float rounding. When the
    micro-batch's fp32 logits fit in LOGITS_CHUNK_BYTES (the demo's vocabulary: its numbers stay bit for bit
    those of the model's forward), or the architecture is not in PLAIN_LM_HEADS, the model's own forward gives
    all the logits at once.

    targets: [B, T], the response tokens (the last T columns of mb["input_ids"])."""
    rows, n = targets.shape
    inputs = {key: mb[key] for key in ("input_ids", "attention_mask", "position_ids")}
    chunk = max(1, LOGITS_CHUNK_BYTES // (rows * model.config.vocab_size * 4))  # positions per chunk
    if chunk >= n or model.config.model_type not in PLAIN_LM_HEADS:
        return reduce(model(**inputs, logits_to_keep=n + 1).logits[:, :-1], targets)  # [B, T, vocab] at once
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, -n - 1:-1]  # [B, T, hidden]
    head = model.get_output_embeddings()  # hidden -> vocab (tied to the input embeddings in Qwen2.5)
    return torch.cat([torch.utils.checkpoint.checkpoint(lambda h, t: reduce(head(h), t), h, t, use_reentrant=False)
                      for h, t in zip(hidden.split(chunk, dim=1), targets.split(chunk, dim=1))], dim=1)  # [B, T]


# ============================================================================================
# Several processes: `torchrun` data parallel, one device per rank (CleanRL's ppo_atari_multigpu.py)
# ============================================================================================
# Under torchrun every rank runs this same script on its share of each iteration's problems. The
# settings stay global (--prompts-per-iteration, --minibatch-size): each rank samples whole groups, the Monte
# Carlo states of all ranks are deduplicated and re-sharded evenly, and every statistic of a global minibatch
# (the whitening's sums, the token and response counts, the losses, the ratio-skip and non-finite decisions)
# is summed over the ranks, as are the gradients (each rank's loss is already divided by the global counts).
# Without torchrun nothing here does anything: one process runs exactly as it always did.
def start_distributed(args: Args) -> torch.device | None:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank's device; None
    without torchrun. Only rank 0 prints and shows progress bars."""
    if "WORLD_SIZE" not in os.environ:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_rank() > 0:  # rank 0 speaks for all; the others' errors still reach their stderr
        sys.stdout = open(os.devnull, "w")
        loud = tqdm
        globals()["tqdm"] = type("quiet_tqdm", (loud,), {"__init__": lambda self, *a, **k: loud.__init__(
            self, *a, **{**k, "disable": True})})
    return torch.device("cuda", local_rank) if cuda else pick_device("cpu" if args.device == "auto" else args.device)


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def global_sum(x):
    """The sum of x over every rank (a number or a tensor, returned as given); x itself in one process."""
    if not dist.is_initialized():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.as_tensor(x, dtype=torch.float64).to(device).clone()
    dist.all_reduce(total)
    return total.to(x.device, x.dtype) if torch.is_tensor(x) else total.item()


def every_rank(items: list) -> list:
    """The concatenation of every rank's list, in rank order (all_gather_object); the list itself in one process."""
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def rank_share(items: list) -> list:
    """This rank's share of a list every rank holds alike: items rank, rank + world, ... (all of it in one process)."""
    rank, world = rank_and_world()
    return items[rank::world]


def rank_shard_rollouts(rollout):
    """rollout(prefixes) -> rewards, with the prefixes split evenly in contiguous shards over the ranks (the
    official code's load balancing of MC requests) and the rewards gathered back in order."""
    def sharded(prefixes):
        rank, world = rank_and_world()
        if world == 1:
            return rollout(prefixes)
        bounds = [len(prefixes) * r // world for r in range(world + 1)]
        return every_rank(rollout(prefixes[bounds[rank]:bounds[rank + 1]]))
    return sharded


def shuffled_minibatches(n_rows: int, size: int) -> list[torch.Tensor]:
    """This rank's rows of each shuffled minibatch of `size` responses. One process: randperm(n_rows).split(size).
    Under torchrun the permutation is of the global batch (rank 0's draw) and each rank keeps the rows of each
    minibatch that it holds: the minibatches are those of one process holding the whole batch."""
    if not dist.is_initialized():
        return list(torch.randperm(n_rows).split(size))
    counts = every_rank([n_rows])
    offset = sum(counts[:dist.get_rank()])
    permutation = [torch.randperm(sum(counts))]
    dist.broadcast_object_list(permutation, src=0)  # rank 0's draw
    return [rows[(rows >= offset) & (rows < offset + n_rows)] - offset for rows in permutation[0].split(size)]


def sum_gradients(models) -> None:
    """Sum every rank's gradients in one flat all-reduce (a rank with no rows in a minibatch adds zeros)."""
    if not dist.is_initialized():
        return
    params = [p for model in models if model is not None for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def global_sums(sums: dict) -> dict:
    """Every figure of a dict of sums, summed over the ranks (a figure a rank lacks counts 0 there)."""
    if not dist.is_initialized():
        return sums
    keys = sorted(set(every_rank(list(sums))))
    totals = global_sum(torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64))
    return defaultdict(float, zip(keys, totals.tolist()))



# ============================================================================================
# SFT warm-up, optimizers, evaluation
# ============================================================================================
def supervised_finetune(model, tokenizer, problems: list[dict], args: Args, device) -> float:
    """SFT on the reference solutions (the paper's RL starts from an SFT model): cross-entropy on the
    response tokens of prompt + "\\n{solution}\\n" + EOS, averaged over each sequence's tokens, then over a
    batch of sft_batch_size (computed in micro-batches: memory only). Returns the last step's loss."""
    prompts = encode_prompts(tokenizer, [p["problem"] for p in problems])
    targets = [ids + [tokenizer.eos_token_id] for ids in  # one call for all, as encode_prompts
               tokenizer([make_sft_target(p["solution"]) for p in problems], add_special_tokens=False)["input_ids"]]
    steps = max(1, int(args.sft_epochs * len(problems) / args.sft_batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    schedule = warmup_linear_schedule(optimizer, steps, args.warmup_ratio)
    order, loss = [], float("nan")
    model.train(args.gradient_checkpointing)  # train() only to let checkpointing run; dropout is zeroed
    for _ in tqdm(range(steps), desc="SFT warm-up", leave=False):
        if len(order) < args.sft_batch_size:
            order += random.sample(range(len(problems)), len(problems))
        rows, order = order[:args.sft_batch_size], order[args.sft_batch_size:]
        mine = rank_share(rows)  # under torchrun each rank takes its share of the batch (none: it adds zeros)
        batch = collate([prompts[i] for i in mine], [targets[i] for i in mine], tokenizer.pad_token_id) if mine else {}
        loss = 0.0
        for start in range(0, len(mine), args.micro_batch_size):
            micro = torch.arange(start, min(start + args.micro_batch_size, len(mine)))
            mb = slice_batch(batch, micro, device)
            logp = response_logprobs(model, mb, temperature=1.0)  # [rows, T], 0 at padding
            # official: the token mean of each sequence, then the mean over the batch
            micro_loss = -(logp.sum(-1) / mb["response_mask"].sum(-1)).sum() / len(rows)
            micro_loss.backward()
            loss += micro_loss.item()
        sum_gradients([model])
        loss = global_sum(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss


def warmup_linear_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over the first warmup_ratio of steps, then linear decay to 0 (paper)."""
    warmup = max(1, int(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))


def value_lr(args: Args) -> float:
    return args.lr if args.value_lr == -1 else args.value_lr


def make_optimizers(policy, value_model, args: Args) -> tuple[list, list]:
    """AdamW for the policy (and the critic), each with the warmup-then-linear-decay schedule over the
    whole run's optimizer steps (paper appendix)."""
    steps_per_iteration = math.ceil(args.prompts_per_iteration * args.samples_per_prompt / args.minibatch_size)
    total_steps = args.iterations * args.epochs * steps_per_iteration
    optimizers = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
                  for model, lr in [(policy, args.lr), (value_model, value_lr(args))] if model is not None]
    return optimizers, [warmup_linear_schedule(o, total_steps, args.warmup_ratio) for o in optimizers]


def warm_up_critic(run: Run, args: Args) -> dict:
    """Before RL, train the value network alone (the policy does not move) on `critic_warmup` iterations
    of the SFT policy's rollouts, with the PPO update's value loss, minibatches and epochs: a careful
    practitioner's start, so that the first advantages do not come from an untrained head. Each batch is
    scored before the critic trains on it, so its explained variance is measured on unseen rollouts."""
    optimizer = torch.optim.AdamW(run.value_model.parameters(), lr=value_lr(args), weight_decay=0.0)
    picker, record, start = random.Random(args.seed + 2), {"tokens/critic_warmup": 0}, time.time()
    for i in range(args.critic_warmup):
        indices = picker.sample(range(len(run.train)), args.prompts_per_iteration)
        episodes = sample_episodes(run.policy, run.tokenizer, run.train, rank_share(indices), args)
        batch = collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], run.tokenizer.pad_token_id)
        fixed = precompute(run.policy, run.reference, run.value_model, batch, args, run.device)
        _, returns, stats = assign_credit(episodes, batch, fixed, run.policy, run.tokenizer, run.train, args)
        record["critic_warmup/explained_variance"] = stats["value/explained_variance"]
        mask = batch["response_mask"]
        run.value_model.train(args.gradient_checkpointing)
        for _ in range(args.epochs):
            for minibatch in shuffled_minibatches(len(episodes), args.minibatch_size):
                n_tokens = global_sum(mask[minibatch].sum().item())
                for first in range(0, len(minibatch), args.micro_batch_size):  # none without a row here
                    rows = minibatch[first:first + args.micro_batch_size]
                    mb = slice_batch(batch, rows, run.device)
                    n = mb["response_mask"].shape[1]
                    (value_loss(response_values(run.value_model, mb), fixed["values_old"][rows, -n:].to(run.device),
                                returns[rows, -n:].to(run.device), mb["response_mask"], args.value_clip_range
                                ).sum() / n_tokens).backward()
                sum_gradients([run.value_model])
                torch.nn.utils.clip_grad_norm_(run.value_model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        run.value_model.eval()
        record["tokens/critic_warmup"] += global_sum(sum(len(e.response_ids) for e in episodes))
        print(f"critic warm-up {i + 1}/{args.critic_warmup}: explained variance of the returns, before training on "
              f"them: {record['critic_warmup/explained_variance']:.3f}")
    record["time/critic_warmup_s"] = time.time() - start
    return record


def evaluate(model, tokenizer, problems: list[dict], args: Args) -> float:
    """pass@1: the mean accuracy of eval_samples samples per held-out problem at the eval temperature
    (under torchrun each rank samples its share of the problems)."""
    mine = rank_share(problems)
    prompts = encode_prompts(tokenizer, [p["problem"] for p in mine])
    prefixes = [ids for ids in prompts for _ in range(args.eval_samples)]
    outputs = sample_continuations(model, prefixes, [args.max_new_tokens] * len(prefixes),
                                   eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                   temperature=args.eval_temperature, top_p=args.top_p,
                                   batch_size=args.rollout_batch_size, desc="evaluating")
    rewards = [reward_of(args.task, decode_response(tokenizer, ids), ended, mine[i // args.eval_samples]["answer"])
               for i, (ids, ended) in enumerate(outputs)]
    return global_sum(sum(rewards)) / (len(problems) * args.eval_samples)


# ============================================================================================
# A run: set up, bookkeeping after each iteration, checkpoints, signals, the end
# ============================================================================================
@dataclass
class Run:
    """What a training run holds; a checkpoint saves all of it that changes."""
    tokenizer: object
    policy: nn.Module
    reference: nn.Module  # the frozen SFT model: the KL reference
    value_model: nn.Module | None
    optimizers: list
    schedulers: list
    train: list[dict]
    validation: list[dict]  # [] when there is no separate validation set
    test: list[dict]
    device: torch.device
    sampler: random.Random = field(default_factory=random.Random)  # picks each iteration's problems
    history: list[dict] = field(default_factory=list)  # one metrics record per iteration, 0 = before RL
    iteration: int = 0  # the last iteration saved in a checkpoint
    nonfinite_in_a_row: int = 0  # optimizer steps skipped in a row for a non-finite loss (spans iterations)
    start_time: float = 0.0  # wall clock of the RL part, continued on resume
    trackers: list = field(default_factory=list)  # --report-to: (log, close) per open tracker; not saved


def start_run(args: Args) -> Run:
    """Everything before the first iteration: seeds, checks that fail fast, data, the model and its SFT
    warm-up, the frozen reference, the critic, optimizers; then the first evaluation and checkpoint, or
    the state of the checkpoint to resume."""
    random.seed(args.seed)  # seeding in one place
    torch.manual_seed(args.seed)
    device = start_distributed(args) or pick_device(args.device)  # under torchrun: this rank's device
    check_hub_reachable(args)  # seconds, not minutes, when the hub is needed and cannot be reached
    check_output_dir(args)
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    train, validation, test = load_task(args)
    if args.prompts_per_iteration > len(train):
        sys.exit(f"error: --prompts-per-iteration {args.prompts_per_iteration} is more than the {len(train)} training "
                 f"problems; lower it or give more data")
    validation = [] if validation is test else validation[:args.eval_problems or None]  # [] = no separate one
    test = test[:args.eval_problems or None]
    policy, tokenizer = load_model_and_tokenizer(args, device)
    print(f"model {args.model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M params) on {device} | "
          f"task {args.task}: {len(train)} train, {len(validation)} validation, {len(test)} test problems | "
          f"critic {args.critic} | output {args.output_dir}")
    check_prompt_lengths(policy, tokenizer, train + validation + test, args)
    if args.sft_epochs > 0 and checkpoint is None:
        start = time.time()
        try:
            loss = supervised_finetune(policy, tokenizer, train, args, device)
        except KeyboardInterrupt:
            sys.exit("interrupted during the SFT warm-up, before the first checkpoint: nothing was saved")
        print(f"SFT warm-up: {args.sft_epochs:g} epochs, final loss {loss:.3f}, {time.time() - start:.0f}s")
    random.seed(args.seed)  # RL's random stream starts from the seed whatever came before, so RL from a saved SFT
    torch.manual_seed(args.seed)  # model (--model DIR --sft-epochs 0) repeats the RL of the run that trained it
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if args.offload_reference:
        reference.to("cpu")
    value_model = ValueNetwork.from_policy(policy).eval() if args.critic == "value" else None  # a copy of the start
    if rank_and_world()[0] > 0:  # under torchrun: the same models on every rank, then a random stream of its own
        torch.manual_seed(args.seed + 1_000_003 * rank_and_world()[0])
    run = Run(tokenizer, policy, reference, value_model, *make_optimizers(policy, value_model, args),
              train, validation, test, device)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, run, args.resume)  # refuses, before anything is written, what does not fit
    if rank_and_world()[0] == 0:  # under torchrun rank 0 alone writes
        os.makedirs(args.output_dir, exist_ok=True)  # the first write: every check above has passed
    if checkpoint is None:
        record = {"iteration": 0}
        if value_model is not None and args.critic_warmup:
            record.update(warm_up_critic(run, args))
        evaluate_into(record, run, args)
        print(f"pass@1 before RL: {record['eval/pass@1']:.3f} ({len(test)} held-out problems x {args.eval_samples} "
              f"samples, T={args.eval_temperature}, {record['time/eval_s']:.0f}s)")
        run.sampler, run.history = random.Random(args.seed + 1), [record]
        rewrite_metrics(args, run.history)
        save_checkpoint(args, run, 0)
    else:
        rewrite_metrics(args, run.history)  # drop records written after the checkpoint
        print(f"resumed {args.resume} after iteration {run.iteration}")
    run.start_time = time.time() - run.history[-1].get("time/elapsed_s", 0.0)  # elapsed time continues
    run.trackers = open_trackers(args, run, resumed=checkpoint is not None)  # --report-to
    return run


@contextmanager
def clock(record: dict, phase: str):
    """Time one phase of an iteration into record['time/<phase>_s']."""
    start = time.time()
    yield
    record[f"time/{phase}_s"] = time.time() - start


def evaluate_into(record: dict, run: Run, args: Args) -> None:
    """pass@1 on the test problems, and on the validation problems held out of train (to choose a checkpoint).
    Its samples come from their own random stream, seeded by the run's seed and the iteration: runs of one
    seed that differ only in the critic evaluate the same SFT model on the same samples (pass@1 before RL is
    equal), and evaluating leaves the training's random stream untouched."""
    with clock(record, "eval"), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(args.seed * 100_003 + record["iteration"] + 1_000_003 * rank_and_world()[0])
        record["eval/pass@1"] = evaluate(run.policy, run.tokenizer, run.test, args)
        if run.validation:
            record["eval/val_pass@1"] = evaluate(run.policy, run.tokenizer, run.validation, args)
        if args.eval_train_problems:  # after the others, so their samples do not depend on it
            record["eval/train_pass@1"] = evaluate(run.policy, run.tokenizer, run.train[:args.eval_train_problems], args)


def end_iteration(run: Run, record: dict, episodes: list[Episode], stats: dict, args: Args, stop) -> None:
    """After the update: the iteration's metrics, an evaluation every eval_every iterations, metrics.jsonl,
    a checkpoint every save_every iterations (and on Ctrl-C / SIGTERM, which then ends the run), the
    one-line summary and the credit view."""
    iteration = record["iteration"]
    record.update(stats)
    # this rank's sums; under torchrun summed over the ranks, with the generated tokens of the busiest rank
    local = {"tokens/rollout": sum(len(e.response_ids) for e in episodes), "tokens/mc": stats["tokens/mc"],
             "responses": len(episodes), "train/reward_mean": sum(e.reward for e in episodes),
             "train/truncated_frac": sum(e.truncated for e in episodes),
             "train/steps_mean": sum(len(e.step_starts) for e in episodes)}
    per_rank = every_rank([local])
    totals = {key: sum(r[key] for r in per_rank) for key in local}
    record.update({key: value / totals["responses"] if key.startswith("train/") else value
                   for key, value in totals.items() if key != "responses"})
    if len(per_rank) > 1:
        generated = [r["tokens/rollout"] + r["tokens/mc"] for r in per_rank]
        record["balance/busiest_rank_tokens"] = max(generated) / (sum(generated) / len(generated))
        if "group/advantage_abs" in stats:  # a mean over responses
            record["group/advantage_abs"] = global_sum(stats["group/advantage_abs"] * len(episodes)) / totals["responses"]
    run.nonfinite_in_a_row = stats["losses/nonfinite_in_a_row"]
    if iteration % args.eval_every == 0 or iteration == args.iterations:
        evaluate_into(record, run, args)
    record["time/elapsed_s"] = time.time() - run.start_time
    log_metrics(args, record)
    report(run.trackers, record)
    run.history.append(record)
    signals = [signum for signum in every_rank([stop.received]) if signum is not None]
    stop_now = bool(signals)  # a signal to any rank stops every rank after the same iteration
    if stop_now and stop.received is None:  # a rank the signal missed takes it, and a later one (torchrun's, as
        stop.received = signals[0]  # the ranks leave) for the same stop
    if stop_now or (args.save_every and iteration % args.save_every == 0) or iteration == args.iterations:
        save_checkpoint(args, run, iteration)
        run.iteration = iteration  # the last good checkpoint
    extra = (f"mc_std {record['mc/value_std']:.2f} ev {record['mc/explained_variance']:.2f}" if args.critic == "mc"
             else f"v_loss {record['losses/value_loss']:.3f} ev {record['value/explained_variance']:.2f}"
             if args.critic == "value" else f"|A| {record['group/advantage_abs']:.2f}")
    evaluated = f" | pass@1 {record['eval/pass@1']:.3f}" if "eval/pass@1" in record else ""
    tqdm.write(f"iter {iteration:3d} | reward {record['train/reward_mean']:.3f}{evaluated} | "
               f"pg {record['losses/policy_loss']:+.4f} kl {record['losses/kl']:.4f} "
               f"clip {record['losses/clipfrac']:.3f} | {extra} | rollout {record['time/rollout_s']:.1f}s "
               f"credit {record['time/credit_s']:.1f}s update {record['time/update_s']:.1f}s")
    if args.show_credit and "eval/pass@1" in record:
        print_credit(run.tokenizer, episodes, run.train, iteration, args)
    if stop_now:
        print(f"stopped by {signal.Signals(stop.received).name} after iteration {iteration}: checkpoint saved "
              f"to {os.path.join(args.output_dir, 'checkpoint.pt')}; continue with: {continue_command(args)}",
              file=sys.stderr if rank_and_world()[0] == 0 else sys.stdout)
        sys.exit(128 + stop.received)


def continue_command(args: Args) -> str:
    """The command that continues this run from its checkpoint."""
    world = rank_and_world()[1]
    launch = "python" if world == 1 else f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', world)}"
    return f"{launch} vineppo.py --output-dir {args.output_dir} --resume"


def finish_run(run: Run, args: Args) -> dict:
    """The final checkpoint (policy, tokenizer, critic, settings), curves.png and the before/after line."""
    final = os.path.join(args.output_dir, "final")
    if rank_and_world()[0] == 0:
        save_final(run.policy, run.tokenizer, run.value_model, args)
        try:
            plot_curves([args.output_dir], os.path.join(args.output_dir, "curves.png"))
        except ImportError:
            print("matplotlib is not installed: no curves.png (pip install matplotlib)")
    evaluated = [r["eval/pass@1"] for r in run.history if "eval/pass@1" in r]
    before, after = evaluated[0], evaluated[-1]
    print(f"pass@1 before RL {before:.3f} -> after RL {after:.3f} ({after - before:+.3f}) | "
          f"{args.iterations} iterations in {time.time() - run.start_time:.0f}s | checkpoint {final}")
    return {"before": before, "after": after, "history": run.history[1:], "final_dir": final, "policy": run.policy,
            "reference": run.reference, "value_model": run.value_model}


def check_output_dir(args: Args) -> None:
    """Before anything is loaded: refuse a directory that holds a run (unless --overwrite or --resume) or
    that cannot be written. Nothing is created yet, so a run that fails while loading leaves nothing."""
    held = [name for name in ("metrics.jsonl", "checkpoint.pt", "final") if os.path.exists(os.path.join(args.output_dir, name))]
    own_run = args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(args.output_dir)
    if held and not (args.overwrite or own_run):  # resuming writes into the checkpoint's own run only
        sys.exit(f"error: {args.output_dir} already holds a run ({', '.join(held)}); continue it with --resume, "
                 f"replace it with --overwrite, or choose another --output-dir")
    existing = os.path.abspath(args.output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        sys.exit(f"error: cannot write to --output-dir {args.output_dir!r} ({existing} is not a writable directory); "
                 f"choose another")


def write_atomically(path: str, write) -> None:
    """write(temporary_path), then rename over path: a crash mid-write never leaves a half-written file."""
    temporary = path + ".tmp"
    write(temporary)
    os.replace(temporary, path)


def rng_states() -> dict:
    """The random states a run draws from: python's, torch's, and this rank's GPU's (torchrun set its device)."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]  # a list in older checkpoints: every visible GPU's state, this rank's among them
        if isinstance(cuda, list):
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def all_finite(*models) -> bool:
    return all(bool(torch.isfinite(p).all()) for model in models if model is not None for p in model.parameters())


def save_checkpoint(args: Args, run: Run, iteration: int) -> str:
    """Everything needed to continue the run exactly (nanoGPT's resume): weights, optimizer and schedule
    states, every random state, the settings and the metrics so far. Written atomically; never with NaNs."""
    if not all_finite(run.policy, run.value_model):
        raise FloatingPointError("non-finite weights: refusing to overwrite the last good checkpoint")
    rank, world = rank_and_world()
    rank_rng = every_rank([rng_states()])  # every rank's random streams
    checksums = every_rank([sum(p.double().sum().item() for m in (run.policy, run.value_model) if m is not None
                                for p in m.parameters())] if world > 1 else [])
    assert len(set(checksums)) <= 1, f"the ranks' weights differ: {checksums}"  # data parallel keeps them equal
    path = os.path.join(args.output_dir, "checkpoint.pt")
    if rank == 0:  # under torchrun rank 0 alone writes
        state = {"iteration": iteration, "args": asdict(args), "world_size": world, "policy": run.policy.state_dict(),
                 "reference": run.reference.state_dict(), "value": run.value_model.state_dict() if run.value_model else None,
                 "optimizers": [o.state_dict() for o in run.optimizers], "schedulers": [s.state_dict() for s in run.schedulers],
                 "rng": rank_rng[0], "sampler": run.sampler.getstate(), "history": run.history,
                 "nonfinite_in_a_row": run.nonfinite_in_a_row, **({"rank_rng": rank_rng} if world > 1 else {})}
        write_atomically(path, lambda temporary: torch.save(state, temporary))
    global_sum(0)  # a barrier: no rank goes on, or ends the run on a stop, before the checkpoint is on disk
    return path


# What a checkpoint holds, and the type of each entry: `read_checkpoint` refuses anything else.
CHECKPOINT_TYPES = {"iteration": int, "args": dict, "policy": dict, "reference": dict, "value": (dict, type(None)),
                    "optimizers": list, "schedulers": list, "rng": dict, "sampler": tuple, "history": list,
                    "nonfinite_in_a_row": int, "world_size": int}


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint as plain data: weights_only=True unpickles tensors, numbers, strings and containers
    and nothing else, so a file that carries code is refused instead of run (PyTorch's default since 2.6).
    Anything that is not what `save_checkpoint` writes ends the run with one line; nothing is written."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - a damaged file and one that carries code get the same answer
        sys.exit(f"error: cannot read {path} as a checkpoint of plain data ({type(error).__name__}: it is damaged, "
                 f"not a checkpoint, or carries code); resume from another checkpoint or start a new run")
    problems = checkpoint_problems(checkpoint)
    if problems:
        sys.exit(f"error: {path} is not a checkpoint of vineppo.py ({'; '.join(problems)}); resume from another "
                 f"checkpoint or start a new run")
    return checkpoint


def checkpoint_problems(checkpoint) -> list[str]:
    """What is missing or of the wrong type in a loaded checkpoint ([] when it has what a resume reads)."""
    if not isinstance(checkpoint, dict):
        return [f"it holds a {type(checkpoint).__name__}, not a dict"]
    problems = [f"no '{key}'" if key not in checkpoint else f"'{key}' is a {type(checkpoint[key]).__name__}"
                for key, kind in CHECKPOINT_TYPES.items() if not isinstance(checkpoint.get(key), kind)]
    kinds = {f.name: {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}[f.type] for f in fields(Args)}
    for name, value in (checkpoint["args"] if isinstance(checkpoint.get("args"), dict) else {}).items():
        if name not in kinds or not isinstance(value, kinds[name]) or (isinstance(value, bool) and bool not in kinds[name]):
            problems.append(f"setting {name!r} = {value!r} is not one of vineppo.py's")
    for key in ("policy", "reference", "value"):
        if isinstance(checkpoint.get(key), dict) and not all(map(torch.is_tensor, checkpoint[key].values())):
            problems.append(f"'{key}' holds something other than tensors")
    if isinstance(checkpoint.get("rng"), dict) and not {"python", "torch"} <= set(checkpoint["rng"]):
        problems.append("'rng' lacks the python or torch random state")
    world = checkpoint.get("world_size")
    if isinstance(world, int) and world < 1:
        problems.append(f"'world_size' is {world}, not a number of processes")
    if isinstance(world, int) and world > 1 and not (isinstance(checkpoint.get("rank_rng"), list) and
                                                     len(checkpoint["rank_rng"]) == world and
                                                     all(isinstance(r, dict) and {"python", "torch"} <= set(r)
                                                         for r in checkpoint["rank_rng"])):
        problems.append("'rank_rng' does not hold one random state per rank")
    if isinstance(checkpoint.get("iteration"), int) and isinstance(checkpoint.get("history"), list):
        problems += history_problems(checkpoint["history"], checkpoint["iteration"])
    return problems


def history_problems(history: list, iteration: int) -> list[str]:
    """What a resume cannot use in the saved metrics: one record per iteration 0..iteration, each a dict of
    numbers holding its own 'iteration', the first with the pass@1 before RL that the final line compares to."""
    if iteration < 0 or len(history) != iteration + 1:
        return [f"'history' holds {len(history)} records for iterations 0 to {iteration}"]
    for i, record in enumerate(history):
        numbers = isinstance(record, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and
                                                   not isinstance(v, bool) for k, v in record.items())
        if not numbers or record.get("iteration") != i:
            return [f"history record {i} is not a dict of numbers with 'iteration': {i}"]
        if not all(math.isfinite(record[key]) for key in ("eval/pass@1", "time/elapsed_s") if key in record):
            return [f"history record {i} has a non-finite pass@1 or elapsed time"]
    return [] if "eval/pass@1" in history[0] else ["history record 0 lacks 'eval/pass@1' (the pass@1 before RL)"]


def state_problems(saved, fresh, where: str) -> list[str]:
    """Where a saved optimizer or scheduler state differs in kind from a freshly built one's: a flag where it has
    a flag, an int where an int, a finite number where a float, a list of its length, a dict with its keys (a
    missing flag keeps its default, as torch does for the states of older versions)."""
    if isinstance(fresh, (list, tuple)):
        if not (isinstance(saved, (list, tuple)) and len(saved) == len(fresh)):
            return [f"{where} is not a list of {len(fresh)}"]
        return [p for i, (s, f) in enumerate(zip(saved, fresh)) for p in state_problems(s, f, f"{where}[{i}]")]
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return [f"{where} is not a dict"]
        missing = [key for key, f in fresh.items() if key not in saved and not (isinstance(f, bool) or f is None)]
        if missing:
            return [f"{where} lacks {missing[0]!r}"]
        return [p for key in fresh if key in saved for p in state_problems(saved[key], fresh[key], f"{where}[{key!r}]")]
    number = isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(fresh, bool) or fresh is None:  # a flag: amsgrad, foreach, ...
        kind, ok = "a flag", isinstance(saved, bool) or saved is None
    elif isinstance(fresh, int):  # last_epoch, _step_count, a parameter's index
        kind, ok = "an int", number and isinstance(saved, int)
    elif isinstance(fresh, float):  # lr, eps, base_lrs, ...
        kind, ok = "a finite number", number and math.isfinite(saved)
    else:
        kind, ok = f"a {type(fresh).__name__}", type(saved) is type(fresh)
    return [] if ok else [f"{where} = {str(saved)[:40]!r} is not {kind}"]


def optimizer_state_problems(saved: dict, optimizer, where: str) -> list[str]:
    """A saved optimizer state's per-parameter tensors (AdamW's step and moments): each a scalar or of the
    shape of the parameter it belongs to (its settings are checked by `state_problems`)."""
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    shapes = dict(zip(ids, (p.shape for group in optimizer.param_groups for p in group["params"])))
    for index, state in saved["state"].items():  # `state_problems` made sure it is a dict
        if not (index in shapes and isinstance(state, dict) and
                all(torch.is_tensor(t) and t.shape in (torch.Size([]), shapes[index]) for t in state.values())):
            return [f"{where}['state'][{index!r}] is not a dict of tensors shaped like its parameter"]
    return []


def restore_checkpoint(checkpoint: dict, run: Run, path: str) -> None:
    """Put the run back as it was saved; weights of another shape (another model), and optimizer or scheduler
    states a step could not use, end the run with one line (every state is checked before the first is loaded)."""
    problems = [p for owner, name in [(run.optimizers, "optimizers"), (run.schedulers, "schedulers")]
                for i, (item, state) in enumerate(zip(owner, checkpoint[name]))
                for p in state_problems(state, item.state_dict(), f"{name}[{i}]") or
                (optimizer_state_problems(state, item, f"{name}[{i}]") if name == "optimizers" else [])]
    if problems:
        sys.exit(f"error: {path} is not a checkpoint of vineppo.py ({problems[0]}); resume from another checkpoint "
                 f"or start a new run")
    try:
        run.policy.load_state_dict(checkpoint["policy"])
        run.reference.load_state_dict(checkpoint["reference"])
        if run.value_model is not None:
            run.value_model.load_state_dict(checkpoint["value"])
        for owner, states in [(run.optimizers, checkpoint["optimizers"]), (run.schedulers, checkpoint["schedulers"])]:
            if len(owner) != len(states):
                raise ValueError(f"{len(states)} optimizer or scheduler states for {len(owner)}")
            for item, state in zip(owner, states):
                item.load_state_dict(state)
        run.sampler.setstate(checkpoint["sampler"])
        rank, world = rank_and_world()
        if checkpoint["world_size"] != world:  # read_checkpoint made sure it is there
            sys.exit(f"error: {path} was saved by {checkpoint['world_size']} process(es), this run has {world}; "
                     f"resume it with torchrun --nproc-per-node {checkpoint['world_size']} (or without torchrun for 1)")
        set_rng_states(checkpoint["rank_rng"][rank] if world > 1 else checkpoint["rng"])  # last: building the
        # models above drew random numbers
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as error:
        sys.exit(f"error: {path} does not fit this run ({type(error).__name__}: {first_line(error)}); resume it with the "
                 f"model and settings it was saved with, or start a new run")
    if not all_finite(run.policy, run.reference, run.value_model):
        sys.exit(f"error: {path} holds non-finite weights; resume from another checkpoint or start a new run")
    run.history, run.iteration = checkpoint["history"], checkpoint["iteration"]
    run.nonfinite_in_a_row = checkpoint["nonfinite_in_a_row"]


class StopSignals:
    """`with StopSignals() as stop:` Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current
    iteration and save a checkpoint; a second one exits at once (checkpoints are written atomically).
    A FloatingPointError (non-finite steps in a row) inside ends the run with one line."""

    def __init__(self, run: Run | None = None, args: Args | None = None):
        self.received, self.previous, self.run, self.args = None, {}, run, args
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.received is not None and dist.is_initialized():
            return  # torchrun forwards the terminal's Ctrl-C that this rank got too: the same stop, not a second
        if self.received is not None:
            print(f"\n{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if rank_and_world()[0] == 0:  # under torchrun the terminal's Ctrl-C reaches every rank: one says it
            print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving a checkpoint "
                  f"(press Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:  # the line first: torchrun's SIGTERM, as it ends the ranks left, must not cut it
            if self.run is not None:  # start_run saved a checkpoint (or resumed one) before the loop
                exit_if_lost_contact(error, os.path.join(self.args.output_dir, "checkpoint.pt"), self.args)
        finally:
            close_trackers(self.run, error)  # --report-to: the end, a stop or an error
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
        if kind is FloatingPointError and self.run is not None:  # the NaN never reached the weights or a checkpoint
            sys.exit(f"error: {error} in iteration {len(self.run.history)}; the last good checkpoint is "
                     f"{os.path.join(self.args.output_dir, 'checkpoint.pt')} (iteration {self.run.iteration}): "
                     f"resume it with --resume, or start again with a lower --lr")


def save_final(policy, tokenizer, value_model, args: Args) -> str:
    """Write the final checkpoint to a temporary directory, then rename it: never a half-written one."""
    final, temporary = os.path.join(args.output_dir, "final"), os.path.join(args.output_dir, "final.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    policy.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    if value_model is not None:
        value_model.backbone.save_pretrained(os.path.join(temporary, "value"))
        torch.save(value_model.head.state_dict(), os.path.join(temporary, "value", "value_head.pt"))
    with open(os.path.join(temporary, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    return final


def log_metrics(args: Args, record: dict) -> None:
    if rank_and_world()[0] > 0:
        return
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(args: Args, history: list[dict]) -> None:
    """metrics.jsonl holds exactly the records of `history` (a resumed run drops what came after its checkpoint)."""
    if rank_and_world()[0] > 0:
        return
    def write(temporary):
        with open(temporary, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)
    write_atomically(os.path.join(args.output_dir, "metrics.jsonl"), write)


# ============================================================================================
# Live dashboards: --report-to trackio, wandb, tensorboard (TRL's `report_to`)
# ============================================================================================
TRACKERS = ("trackio", "wandb", "tensorboard")  # each name is also the pip package that provides it


def open_trackers(args: Args, run: Run, resumed: bool) -> list:
    """Open the run in each --report-to tracker (rank 0 only) with the settings as its config, log the records
    so far of a new run, and return one (log, close) pair per tracker. A resumed run continues its tracker run:
    W&B by the id kept in <output-dir>/wandb-run-id, trackio by name, TensorBoard in <output-dir>/tensorboard,
    where purge_step drops what was logged after the checkpoint (iterations that run again)."""
    chosen = [name for name in TRACKERS if name in args.report_to.split(",")]
    if not chosen or rank_and_world()[0] > 0:
        return []
    name, config, opened = args.run_name or os.path.basename(os.path.abspath(args.output_dir)), asdict(args), []
    if "trackio" in chosen:  # local: a SQLite store under TRACKIO_DIR (default ~/.cache/huggingface/trackio)
        import trackio
        state = random.getstate()  # trackio.init draws from python's random: the run's stream stays as it was
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "vineppo"), name=name, config=config,
                     resume="allow" if resumed else "never")
        random.setstate(state)
        opened.append((lambda record: trackio.log(record, step=record["iteration"]), lambda code: trackio.finish()))
    if "wandb" in chosen:
        import wandb
        id_file = os.path.join(args.output_dir, "wandb-run-id")
        if not (resumed and os.path.exists(id_file)):  # a new run, a new id (os.urandom: not the seeded streams)
            write_atomically(id_file, lambda temporary: Path(temporary).write_text(os.urandom(4).hex()))
        run_id = Path(id_file).read_text().strip()
        mode = None if os.environ.get("WANDB_MODE") or wandb.login(prompt=False) else "offline"  # never a prompt
        if mode:
            print(f"W&B: no API key (wandb login) and WANDB_MODE unset: logging offline; upload with: wandb sync "
                  f"{os.path.join(args.output_dir, 'wandb', 'offline-run-*')}")
        wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vineppo"), name=name, id=run_id,
                               resume="allow", config=config, dir=args.output_dir, mode=mode)
        opened.append((lambda record: wandb_run.log(record, step=record["iteration"]), wandb_run.finish))
    if "tensorboard" in chosen:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"), purge_step=run.iteration + 1 if resumed else 0)
        writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")
        opened.append((lambda record: [writer.add_scalar(key, value, record["iteration"]) for key, value in record.items()],
                       lambda code: writer.close()))
    for record in [] if resumed else run.history:
        report(opened, record)
    return opened


def report(trackers: list, record: dict) -> None:
    """Send one iteration's record (metrics.jsonl's keys, its numbers) to every open tracker."""
    numbers = {key: value for key, value in record.items() if isinstance(value, (int, float))}
    for log, _ in trackers:
        log(numbers)


def close_trackers(run: Run | None, error: BaseException | None) -> None:
    """End every tracker's run: at the end of the loop, on a stop (Ctrl-C, SIGTERM) and on an error."""
    code = 0 if error is None else error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
    for _, close in run.trackers if run is not None else []:
        close(code)
    if run is not None:
        run.trackers = []


# ============================================================================================
# Seeing the credit: a step-by-step view of one response, and figures of a run
# ============================================================================================
def store_critic_credit(episodes: list[Episode], token_advs: torch.Tensor, token_values: torch.Tensor) -> None:
    """--critic value: keep, per response, the critic's V(s) at each step start and the GAE advantage of
    each token, exactly as the update uses them, so the credit view reads both methods the same way.
    token_advs, token_values: [B, T], right-aligned like collate's responses."""
    for b, e in enumerate(episodes):
        n = len(e.response_ids)
        e.token_advantages = token_advs[b, token_advs.shape[1] - n:].tolist()
        e.step_values = [token_values[b, token_values.shape[1] - n + t].item() for t in e.step_starts]


def credit_rows(tokenizer, episode: Episode) -> list[dict]:
    """One row per step of a graded response: its text, V(s) before it, V after it (the reward R after
    the last step: V(terminal) = 0), and its advantage = the mean of its tokens' advantages as the update
    used them, before whitening. With --critic mc that mean IS the step advantage A_i = after - before;
    with --critic value (GAE, gamma = lambda = 1) each token gets R - V(s_t); with grpo / rloo every step
    gets the response's advantage. A value not estimated (the 25-state cap, grpo, rloo) is None."""
    starts, ids, values = episode.step_starts, episode.response_ids, episode.step_values
    assert len(episode.token_advantages) == len(ids), "credit the episode first (one advantage per token)"
    ends = starts[1:] + [len(ids)]
    before = [values[i] if i < len(values) else None for i in range(len(starts))]
    after = before[1:] + [episode.reward]
    return [{"text": decode_response(tokenizer, ids[a:b]), "value_before": v0, "value_after": v1,
             "advantage": sum(episode.token_advantages[a:b]) / (b - a)}
            for a, b, v0, v1 in zip(starts, ends, before, after)]


def format_credit(tokenizer, episode: Episode, *, problem: dict | None = None, color: bool = False) -> str:
    """The credit view of one response: each step on its own line with V(s) before it, V after it and its
    signed advantage (green up, red down when `color`), then the final answer and its reward.

    From Python, on a solution of your own (see README, "Exercises"):
        e = episode_from_text(tokenizer, problem, "\\n7*2=9\\n9-8=1\\n#### 1", task="arith")
        assign_mc_advantages(model, tokenizer, [e], [problem], args)   # fills e.step_values, e.token_advantages
        print(format_credit(tokenizer, e, problem=problem))
    """
    lines = [f"problem: {problem['problem']} (gold {problem['answer']})"] if problem else []
    lines.append("  V before -> after | advantage | step")
    for row in credit_rows(tokenizer, episode):
        before, after = ("   -" if v is None else f"{v:4.2f}" for v in (row["value_before"], row["value_after"]))
        step = row["text"].strip("\n").replace("\n", "\\n")  # a step starts with its newline; show the rest
        line = f"      {before} -> {after} | {row['advantage']:+9.3f} | {step}"
        if color and row["advantage"] != 0:  # green up, red down
            line = f"\033[{32 if row['advantage'] > 0 else 31}m{line}\033[0m"
        lines.append(line)
    answer = extract_gsm8k_answer(episode.text) if "####" in episode.text else last_boxed(episode.text)
    lines.append(f"  answer {answer} | reward {episode.reward:g}" + (" (cut by the length limit)" if episode.truncated else ""))
    return "\n".join(lines)


def episode_from_text(tokenizer, problem: dict, text: str, *, task: str, index: int = 0) -> Episode:
    """An Episode for a solution you write yourself (it ends with EOS), graded and split like a sampled
    one, so `assign_mc_advantages` and `format_credit` work on it. `index` is the problem's position in
    the list of problems given to `assign_mc_advantages`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    steps = split_response(task, text)
    starts = step_token_starts(functools.partial(decode_response, tokenizer), ids, steps)
    return Episode(index, encode_prompt(tokenizer, problem["problem"]), ids, text,
                   grade(task, text, problem["answer"]), False, steps=steps, step_starts=starts)


def credit_examples(episodes: list[Episode], n: int) -> list[Episode]:
    """Which responses --show-credit N prints: one per problem, for the first N problems in batch order,
    taking problems that have a failed response first and, in each, its first failed response (where
    the credit is interesting); the first response when all of a problem's responses are right."""
    groups: dict[int, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.problem_index, []).append(e)
    ordered = sorted(groups.values(), key=lambda g: all(e.reward == 1 for e in g))  # stable: failures first
    return [next((e for e in g if e.reward < 1), g[0]) for g in ordered[:n]]


def print_credit(tokenizer, episodes: list[Episode], problems: list[dict], iteration: int, args: Args) -> None:
    """--show-credit N: the credit view of N of this iteration's responses (see `credit_examples`)."""
    tqdm.write(f"credit view, iteration {iteration}, --critic {args.critic} (advantage: mean over the step's "
               f"tokens, as the update used it, before whitening)")
    for e in credit_examples(episodes, args.show_credit):
        tqdm.write(format_credit(tokenizer, e, problem=problems[e.problem_index], color=sys.stdout.isatty()))


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"error: {run_dir} has no metrics.jsonl; give output directories of vineppo.py runs")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


TOKEN_KEYS = ("tokens/rollout", "tokens/mc", "tokens/critic_warmup")  # generated: responses, MC, critic warm-up


def plot_curves(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str:
    """Eval pass@1 and train reward of each run against RL iteration, wall-clock seconds of RL (after SFT
    and the first evaluation) and tokens generated (responses, Monte Carlo rollouts, the critic's warm-up
    rollouts): the paper compares
    methods per unit of compute, not per iteration. Writes a PNG; matplotlib is imported only here."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    for run_dir, label in zip(run_dirs, labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]):
        records, tokens = read_metrics(run_dir), 0
        xs = {"iteration": [], "seconds": [], "tokens": []}
        for r in records:
            tokens += sum(r.get(key, 0) for key in TOKEN_KEYS)
            xs["iteration"].append(r["iteration"])
            xs["seconds"].append(r.get("time/elapsed_s", 0.0))
            xs["tokens"].append(tokens)
        for row, key in enumerate(["eval/pass@1", "train/reward_mean"]):
            for col, x_name in enumerate(xs):
                points = [(x, r[key]) for x, r in zip(xs[x_name], records) if key in r]
                if points:
                    axes[row][col].plot(*zip(*points), marker="o" if row == 0 else None, markersize=3, label=label)
    for col, x_label in enumerate(["RL iteration", "wall-clock seconds of RL", "generated tokens (all rollouts)"]):
        for row, y_label in enumerate(["eval pass@1", "train reward (mean)"]):
            axes[row][col].set_xlabel(x_label)
            axes[row][col].set_ylabel(y_label)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summarize_run(run_dir: str) -> dict:
    """One finished run in numbers: pass@1 before and after RL, the credit quality (mean explained variance of
    the returns by the values the advantages came from, over the RL iterations: `mc/explained_variance` or
    `value/explained_variance`; none for GRPO/RLOO), seconds (critic warm-up + RL, without SFT) and tokens
    generated (responses, MC rollouts and the critic's warm-up rollouts)."""
    records = read_metrics(run_dir)
    evaluated = [r["eval/pass@1"] for r in records if "eval/pass@1" in r]
    credit = [r[key] for r in records[1:] for key in ("mc/explained_variance", "value/explained_variance") if key in r]
    try:
        with open(os.path.join(run_dir, "final", "args.json")) as f:
            settings = json.load(f)
    except OSError:
        settings = {}
    return {"run": run_dir, "critic": settings.get("critic", "?"), "seed": settings.get("seed", "?"),
            "before": evaluated[0], "after": evaluated[-1], "gain": evaluated[-1] - evaluated[0],
            "credit_ev": sum(credit) / len(credit) if credit else None,
            "seconds": records[-1].get("time/elapsed_s", 0.0) + records[0].get("time/critic_warmup_s", 0.0),
            "tokens": sum(r.get(key, 0) for r in records for key in TOKEN_KEYS)}


def print_summary(rows: list[dict]) -> None:
    """The table `--plot` prints: one row per run, then each critic's mean over its runs."""
    print(f"{'run':<32} {'critic':>6} {'seed':>4} {'before':>6} {'after':>6} {'gain':>7} {'credit ev':>9} "
          f"{'seconds':>7} {'tokens':>9}")
    by_critic = defaultdict(list)
    for row in rows:
        by_critic[row["critic"]].append(row)
    means = [{"run": f"mean of {len(group)}", "critic": critic, "seed": "",
              **{key: (sum(r[key] for r in group) / len(group) if None not in [r[key] for r in group] else None)
                 for key in ("before", "after", "gain", "credit_ev", "seconds", "tokens")}}
             for critic, group in by_critic.items() if len(group) > 1]
    for row in rows + means:
        credit = "n/a" if row["credit_ev"] is None else f"{row['credit_ev']:.2f}"
        print(f"{os.path.basename(os.path.normpath(row['run'])):<32} {row['critic']:>6} {row['seed']!s:>4} "
              f"{row['before']:6.3f} {row['after']:6.3f} {row['gain']:+7.3f} {credit:>9} {row['seconds']:7.0f} "
              f"{row['tokens']:9.0f}")


def plot_command(argv: list[str]) -> str:
    """python vineppo.py --plot runs/a runs/b [--output FILE]: print a table of the runs (`summarize_run`)
    and overlay their curves (finished or running runs)."""
    parser = argparse.ArgumentParser(prog="vineppo.py --plot", description=plot_command.__doc__)
    parser.add_argument("--plot", nargs="*", required=True, metavar="RUN_DIR", help="output directories of runs")
    parser.add_argument("--output", default="compare.png", help="the PNG to write (default: compare.png)")
    options = parser.parse_args(argv)
    if not options.plot:
        sys.exit("error: --plot needs at least one run directory, e.g. --plot runs/arith-mc-seed0 runs/arith-value-seed0")
    print_summary([summarize_run(run_dir) for run_dir in options.plot])
    try:
        path = plot_curves(options.plot, options.output)
    except ImportError:
        sys.exit("error: --plot needs matplotlib; pip install matplotlib")
    except (OSError, ValueError) as error:  # ValueError: a file type matplotlib cannot write
        sys.exit(f"error: cannot write --output {options.output!r} ({first_line(error)}); choose a writable .png path")
    print(f"wrote {path}")
    return path


def report_failure(error: BaseException) -> None:
    """Under torchrun, leave word in the process group's store that this rank failed, and with what: the ranks
    that then lose contact with it say so (`exit_if_lost_contact`); its traceback follows on its stderr."""
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"vineppo/failed/{rank}", f"rank {rank} failed ({type(error).__name__}: {first_line(error)}; "
                                            f"its traceback is above, lines marked [rank{rank}])")
        store.get(f"vineppo/failed/{rank}")  # stored before this rank leaves
    except Exception:  # noqa: BLE001 - the store went with rank 0: the others say they lost contact
        pass


def exit_if_lost_contact(error: BaseException | None, checkpoint: str | None, args: Args | None = None) -> None:
    """Under torchrun, end with one line when a collective failed because another rank is gone (it failed, was
    killed, or did not answer within --dist-timeout): which rank failed and why, if it left word, and the
    checkpoint to continue from if one was saved. Returns for any other error."""
    if not (dist.is_initialized() and isinstance(error, RuntimeError)
            and re.search(r"gloo|nccl|NCCL|timed out|[Cc]onnection|peer", str(error))):
        return
    rank, world = rank_and_world()
    try:
        store = dist.distributed_c10d._get_default_store()
        failed = [store.get(f"vineppo/failed/{r}").decode() for r in range(world) if store.check([f"vineppo/failed/{r}"])]
    except Exception:  # noqa: BLE001 - the store went with rank 0
        failed = []
    what = (f"{failed[0]}, so rank {rank} stopped too" if failed else
            f"rank {rank} lost contact with the other ranks ({first_line(error)}): one ended without a word (killed, "
            f"out of memory?) or did not answer within --dist-timeout; torchrun's report below names it")
    saved = (f"the last checkpoint, {checkpoint}, is intact: continue with: {continue_command(args)} once every rank "
             f"can run" if checkpoint else "no checkpoint was saved yet: start the run again once every rank can run")
    print(f"error: {what}; {saved}", file=sys.stderr, flush=True)  # each rank left says it: rank 0 may be the one gone
    sys.exit(1)


def first_line(error: BaseException) -> str:
    """An error's first line, for one-line messages (an empty message gives '')."""
    return (str(error).strip().splitlines() or [""])[0][:160]


def run_script() -> None:
    """`python vineppo.py` or `torchrun ... vineppo.py`: main(), and under torchrun one line when this rank lost
    the others (see `exit_if_lost_contact`) instead of a traceback per rank."""
    try:
        main()
    except SystemExit as stop:
        if int(os.environ.get("RANK", "0")) > 0 and isinstance(stop.code, str):
            sys.exit(1)  # under torchrun every rank meets the same bad input: rank 0 alone says it
        raise
    except Exception as error:
        exit_if_lost_contact(error, None)  # before the loop: no checkpoint yet
        report_failure(error)
        raise


if __name__ == "__main__":
    run_script()
