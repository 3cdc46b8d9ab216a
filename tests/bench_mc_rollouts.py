"""Benchmark: VinePPO's Monte Carlo phase against the speed limit of `generate` (not a test; pytest skips it).

    python tests/bench_mc_rollouts.py                  # the demo model, briefly SFT-ed; ~2 minutes on 2 CPU cores
    python tests/bench_mc_rollouts.py --k 9 --states 400 --hidden 256 --layers 8   # other sizes and settings

VinePPO's price is its MC phase: about (sum of steps) x K continuations per iteration, sampled here with
plain Hugging Face `generate` (the official code uses vLLM). `sample_continuations` takes all states of an
iteration in one pool (`mc_values` rolls identical states out once), sorts the rows by prefix length so a
call pads little, caps a call at --rollout-batch-size rows, runs under `torch.inference_mode` and keeps what
`generate` returns (no second pass). Identical prefixes in a call (the K rollouts of a state, the samples of
a problem) share one prefill (`shared_prefix_cache`). None of this changes the rows of a call, their order
or the number of decode steps, so the random stream and the samples stay those of plain `generate`. Left
out for that reason: grouping rows by expected remaining length (not tried: it changes which rows share a
call), and ending a call once every row has reached EOS or its budget (tried: a call that ends earlier
leaves the generator elsewhere for the next one; only 707 of 3,180 rollouts kept their tokens in a test
with many cut responses).

In ONE run, on one model and one set of MC states built the way vineppo.py builds them (responses sampled
from the model, split into steps, steps mapped to tokens, capped and deduplicated by assign_mc_advantages),
it prints, in new tokens per second that a rollout really needed (useful tokens; pads and tokens after EOS
do not count):
- the MC phase as vineppo.py runs it (`assign_mc_advantages`: sampling AND grading), with and without the
  shared prefill of identical prefixes (`share_prefixes`), and whether both drew the same tokens;
- the ceiling: plain `generate` at the same batch size on prompts of one common length (the states' mean),
  every row producing the states' mean number of new tokens (EOS blocked), no bookkeeping at all;
- the naive way: one `generate` call per state with num_return_sequences=K;
- batch efficiency = useful new tokens / (rows x decode steps) of the `generate` calls;
- one full iteration of each critic (`vineppo.main`, --iterations 1) split by phase, and VinePPO / PPO.

One run with the defaults on a 2-core Intel Xeon @ 2.50GHz (torch 2.13 CPU, fp32, 2 threads, the machine to
itself), at commit d373bf6 (the numbers move with the CPU, the thread count and the code):

    way                                              rollouts  useful tokens  seconds  tokens/s  batch eff.  vs ceiling
    MC phase, vineppo.py (assign_mc_advantages)          1608          45058      8.7     5,169        0.79       0.89x
    MC phase without the shared prefill                  1608          45058     10.4     4,350        0.79       0.75x
    ceiling: plain generate, 256 x 51-token prompts       768          21504      3.7     5,811        1.00       1.00x
    naive: one generate per state (32), K sequences       128           3510      7.0       501        0.99       0.09x

    one iteration (16 problems x 8 samples), seconds   rollout  credit  update  total
    VinePPO (--critic mc)                                  1.3    13.0     1.9   16.2
    PPO (--critic value)                                   1.1     1.0     4.3    6.4

So the MC phase ran at 0.89x the ceiling and 10.3x the naive way (402 states x K=4, 28 new tokens per rollout
on average); the shared prefill was worth 1.19x, and both ways drew the same tokens. The remaining gap is
batch efficiency: a row that has ended keeps its seat until the longest row of its call ends. VinePPO / PPO
was 2.5x per iteration (the paper: about 5x at 1.1B and 2x at 7B, with vLLM). This model, after 100 SFT
steps, writes long, mostly wrong solutions; the full demo's SFT model writes shorter ones, so its MC phase is
cheaper. Not measured on a GPU yet; under CUDA's bf16 autocast the shared prefill may round differently from
`generate`'s own by bf16 noise.
"""

import argparse
import contextlib
import functools
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=4, help="MC rollouts per state (the demo's K; paper: 9)")
    p.add_argument("--states", type=int, default=400, help="distinct MC states to roll out (from whole responses)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per generate call (--rollout-batch-size)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length limit of responses (the demo's)")
    p.add_argument("--hidden", type=int, default=128, help="model width (128 = the demo model)")
    p.add_argument("--layers", type=int, default=4, help="model depth (4 = the demo model)")
    p.add_argument("--sft-steps", type=int, default=100, help="SFT steps of 64 before sampling (0: a random model)")
    p.add_argument("--naive-states", type=int, default=32, help="states timed the naive way (it is slow)")
    p.add_argument("--iteration-prompts", type=int, default=16, help="problems x 8 samples in the timed iterations (0 skips)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if min(args.k, args.states, args.batch_size, args.max_new_tokens, args.hidden, args.layers, args.naive_states) < 1:
        sys.exit("error: --k, --states, --batch-size, --max-new-tokens, --hidden, --layers and --naive-states must be at least 1")
    if args.hidden % 32 or args.sft_steps < 0 or args.iteration_prompts not in range(0, 10**6) or 0 < args.iteration_prompts < 16:
        sys.exit("error: --hidden must be a multiple of 32, --sft-steps at least 0, --iteration-prompts 0 or at least 16")
    return args


def build_model(tokenizer, hidden: int, layers: int, seed: int):
    """The demo model (vineppo.build_tiny_model) or the same Qwen2 shape scaled: 32-wide heads, 2 KV heads."""
    if (hidden, layers) == (128, 4):
        return vineppo.build_tiny_model(tokenizer, seed)
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


class GenerateMeter:
    """Wraps model.generate: counts calls, rows x decode steps, and keeps the outputs (to compare runs)."""

    def __init__(self, model):
        self.model, self.inner = model, model.generate
        self.calls, self.row_steps, self.outputs = 0, 0, []
        model.generate = self

    def __call__(self, *a, **kw):
        output = self.inner(*a, **kw)
        self.calls += 1
        self.row_steps += output.shape[0] * (output.shape[1] - kw["input_ids"].shape[1])  # rows x decode steps
        self.outputs.append(output.cpu())
        return output

    def close(self):
        self.model.generate = self.inner


def mc_phase(model, tokenizer, episodes, train, args, share: bool) -> dict:
    """assign_mc_advantages as vineppo.py calls it, timed, with or without the shared prefill."""
    real = vineppo.sample_continuations
    vineppo.sample_continuations = functools.partial(real, share_prefixes=share, progress=False)
    meter = GenerateMeter(model)
    torch.manual_seed(args.seed + 7)
    try:
        start = time.perf_counter()
        stats = vineppo.assign_mc_advantages(model, tokenizer, episodes, train, args)
        seconds = time.perf_counter() - start
    finally:
        vineppo.sample_continuations = real
        meter.close()
    tokens = stats["tokens/mc"]
    return dict(rows=stats["mc/states"] * args.mc_rollouts, tokens=tokens, seconds=seconds,
                efficiency=tokens / meter.row_steps, outputs=meter.outputs, states=stats["mc/states"])


@torch.inference_mode()
def ceiling(model, tokenizer, rows: int, batch_size: int, prompt_len: int, new_tokens: int, args) -> dict:
    """Plain generate, every row useful for every step: distinct prompts of one length, EOS blocked."""
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    calls = max(1, min(3, round(rows / batch_size)))  # as many full batches as the MC phase, at most 3
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(calls):
        input_ids = torch.randint(3, len(tokenizer), (batch_size, prompt_len), generator=generator)  # no special ids
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    seconds = time.perf_counter() - start
    return dict(rows=calls * batch_size, tokens=calls * batch_size * new_tokens, seconds=seconds, efficiency=1.0)


@torch.inference_mode()
def naive(model, tokenizer, states: list[tuple], budgets: list[int], args) -> dict:
    """One generate call per state, K return sequences (what a first implementation does)."""
    meter = GenerateMeter(model)
    tokens = 0
    start = time.perf_counter()
    for state, budget in zip(states, budgets):
        config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                                  max_new_tokens=budget, num_return_sequences=args.mc_rollouts,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        input_ids = torch.tensor([state])  # [1, len(state)]
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=config)[:, len(state):].tolist()  # [K, <= budget]
        for ids in output:
            tokens += ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
    seconds = time.perf_counter() - start
    meter.close()
    return dict(rows=len(states) * args.mc_rollouts, tokens=tokens, seconds=seconds, efficiency=tokens / meter.row_steps)


def one_iteration(model_dir: str, critic: str, bench, out_dir: str) -> dict:
    """One RL iteration of vineppo.main on the saved model: its own timing of rollout, credit and update."""
    argv = ["--model", model_dir, "--task", "arith", "--critic", critic, "--iterations", "1", "--sft-epochs", "0",
            "--prompts-per-iteration", str(bench.iteration_prompts), "--samples-per-prompt", "8",
            "--mc-rollouts", str(bench.k), "--max-new-tokens", str(bench.max_new_tokens), "--minibatch-size", "128",
            "--micro-batch-size", "64", "--lr", "5e-5", "--rollout-batch-size", str(bench.batch_size),
            "--eval-problems", "1", "--eval-samples", "1", "--seed", str(bench.seed), "--output-dir", out_dir]
    with contextlib.redirect_stdout(io.StringIO()):  # main's own report is not part of this one
        record = vineppo.main(argv)["history"][0]
    return {phase: record[f"time/{phase}_s"] for phase in ("rollout", "credit", "update")}


def main():
    bench = parse()
    torch.manual_seed(bench.seed)
    args = vineppo.parse_args(["--mc-rollouts", str(bench.k), "--rollout-batch-size", str(bench.batch_size),
                               "--max-new-tokens", str(bench.max_new_tokens), "--seed", str(bench.seed),
                               "--sft-epochs", str(bench.sft_steps * 64 / 4000), "--output-dir", "unused"])
    train, _, _ = vineppo.load_task(args)
    tokenizer = vineppo.build_tiny_tokenizer()
    model = build_model(tokenizer, bench.hidden, bench.layers, bench.seed).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs | model {n_params / 1e6:.2f}M "
          f"params, fp32 | K={bench.k}, batch {bench.batch_size}, max {bench.max_new_tokens} new tokens")
    start = time.perf_counter()
    if bench.sft_steps:
        loss = vineppo.supervised_finetune(model, tokenizer, train, args, torch.device("cpu"))
        print(f"SFT: {bench.sft_steps} steps of 64, final loss {loss:.3f}, {time.perf_counter() - start:.0f}s")

    # responses sampled as vineppo.py samples them (8 per problem), until their distinct states reach --states
    sampler, episodes, states = random.Random(bench.seed + 1), [], set()
    while len(states) < bench.states:
        indices = sampler.sample(range(len(train)), 16)
        for e in vineppo.sample_episodes(model, tokenizer, train, indices, args):
            valued = {tuple(e.prompt_ids + e.response_ids[:t]) for t in e.step_starts[:args.max_states_per_response]}
            if len(states) < bench.states:
                episodes.append(e)
                states |= valued
    lengths = [len(s) for s in states]
    print(f"{len(episodes)} responses, {len(states)} distinct states (prefix {min(lengths)}-{max(lengths)} tokens, "
          f"mean {statistics.fmean(lengths):.0f}), reward {statistics.fmean(e.reward for e in episodes):.2f}, "
          f"{statistics.fmean(e.truncated for e in episodes):.0%} cut by the length limit")

    vineppo.sample_continuations(model, [[5, 6, 7]] * 8, [4] * 8, eos_id=tokenizer.eos_token_id, progress=False,
                                 pad_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, batch_size=8)  # warm-up
    shared = mc_phase(model, tokenizer, episodes, train, args, share=True)
    unshared = mc_phase(model, tokenizer, episodes, train, args, share=False)
    same = len(shared["outputs"]) == len(unshared["outputs"]) and all(
        torch.equal(a, b) for a, b in zip(shared["outputs"], unshared["outputs"]))
    mean_new = round(shared["tokens"] / shared["rows"])
    top = ceiling(model, tokenizer, shared["rows"], bench.batch_size, round(statistics.fmean(lengths)), mean_new, args)
    prompt_len = {tuple(e.prompt_ids + e.response_ids[:t]): len(e.prompt_ids) for e in episodes for t in e.step_starts}
    some = sorted(states)[::max(1, len(states) // bench.naive_states)][:bench.naive_states]
    slow = naive(model, tokenizer, some, [args.max_new_tokens - (len(s) - prompt_len[s]) for s in some], args)

    rate = lambda r: r["tokens"] / r["seconds"]  # noqa: E731
    print(f"\nMC phase: {shared['states']} states x K={bench.k} = {shared['rows']} rollouts, mean {mean_new} new tokens "
          f"each; the same tokens with and without the shared prefill: {'yes' if same else 'NO'}\n")
    print("| way | rollouts | useful new tokens | seconds | tokens/s | batch efficiency | vs ceiling |")
    print("|---|---|---|---|---|---|---|")
    for name, r in [("MC phase, vineppo.py (`assign_mc_advantages`)", shared),
                    ("MC phase without the shared prefill (before)", unshared),
                    (f"ceiling: plain `generate`, {bench.batch_size} prompts of {round(statistics.fmean(lengths))} tokens, "
                     f"{mean_new} new each", top),
                    (f"naive: one `generate` per state ({len(some)} states), K return sequences", slow)]:
        print(f"| {name} | {r['rows']} | {r['tokens']} | {r['seconds']:.1f} | {rate(r):,.0f} | {r['efficiency']:.2f} | "
              f"{rate(r) / rate(top):.2f}x |")
    print(f"\nMC phase vs ceiling: {rate(shared) / rate(top):.2f}x; vs naive: {rate(shared) / rate(slow):.1f}x; "
          f"shared prefill vs none: {rate(shared) / rate(unshared):.2f}x")

    if bench.iteration_prompts:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(os.path.join(tmp, "model"))
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            phases = {critic: one_iteration(os.path.join(tmp, "model"), critic, bench, os.path.join(tmp, critic))
                      for critic in ("mc", "value")}
        print(f"\nOne RL iteration ({bench.iteration_prompts} problems x 8 samples, K={bench.k}), seconds, timed by vineppo.main:\n")
        print("| critic | rollout | credit | update | total |")
        print("|---|---|---|---|---|")
        for critic, name in (("mc", "VinePPO (`--critic mc`)"), ("value", "PPO (`--critic value`)")):
            t = phases[critic]
            print(f"| {name} | {t['rollout']:.1f} | {t['credit']:.1f} | {t['update']:.1f} | {sum(t.values()):.1f} |")
        print(f"\nVinePPO / PPO per iteration: {sum(phases['mc'].values()) / sum(phases['value'].values()):.1f}x")
    print(f"benchmark total: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
