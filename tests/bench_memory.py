"""Benchmark: the peak memory of each phase of one iteration at Qwen2.5-0.5B's shape (not a test; pytest skips it).

    OMP_NUM_THREADS=2 python tests/bench_memory.py --results bench_memory.json   # ~45 min on 2 CPU cores, < 9 GiB

Measured on the CPU, under the bf16 autocast that CUDA uses (`vineppo.BF16_ON_CPU = True`), with models of
Qwen2.5-0.5B's exact shape (hidden 896, 14 heads, 2 KV heads, intermediate 4864, tied embeddings, the real
vocabulary of 151,936; random weights) and fp32 weights, as vineppo.py runs them. Each case runs in its own
subprocess; a phase's memory is the rise of the process's peak resident memory (VmHWM, reset before the phase
through /proc/self/clear_refs) above its resident memory when the phase starts, with glibc's mmap threshold
fixed so that a freed tensor leaves the process at once. Nothing is computed by hand; what is fitted:

- held all along, at the full 24 layers: the policy's weights and AdamW states, the reference's weights, the
  critic's weights and AdamW states; and the gradients and AdamW's temporaries of an optimizer step.
- phases of one micro-batch (every response at full length, after a 128-token prompt): `precompute` (pi_old
  and reference log-probs, inference mode), one policy micro-batch of the update (`minibatch_backward`:
  forward, loss, backward, with the gradients it allocates), and the critic's forward and backward on the same
  micro-batch (value; above the policy's gradients, still held then). A full 24-layer case would need more RAM
  and hours here, so: 24 layers = the phase at ONE layer with the real vocabulary + 23 x what one more layer
  adds (depth 2 minus depth 1, with a 1,024-token vocabulary: the layers never see the vocabulary).
- sampling: `sample_continuations`, 256 rows (--rollout-batch-size) of 28 distinct 1,120-token prefixes (9
  rollouts each, shared as in the MC phase) plus 32 new tokens, so the KV cache reaches 1,152 tokens; fitted
  to 24 layers the same way.
- before the chunked LM head (`vineppo.logits_in_chunks`), the full logits at once take ~4 fp32 copies of
  [rows, tokens, 151,936]: over this machine's RAM at 8 x 1,024. Their rise at one layer above the layers' own
  is measured at 2 x 512 and 4 x 512 and extended as a line in rows x tokens (marked *).

A GPU holds the same tensors, plus the CUDA context and the caching allocator's slack: the totals are a floor
for a card, and the recommendations add 15% and 0.5 GiB for those (an assumption, not measured here).
--results keeps every measured case in a JSON file, so a second run only prints the report.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: no hub is needed here
import argparse
import functools
import gc
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
PROMPT = 128  # prompt tokens of every row
LAYERS = 24  # Qwen2.5-0.5B's depth
UPDATE_SHAPES = [(8, 1024), (4, 1024)]  # (micro-batch rows, response tokens), measured
BEFORE_SHAPES = [(2, 512), (4, 512)]  # where the full logits fit in this machine's RAM
CARDS_GB = [24, 48, 80]
SMALL_VOCAB = 1024  # for the layers' part of a phase
PHASES = ("precompute", "update_policy", "update_critic")
RESULTS, RESULTS_PATH = {}, ""  # measured cases by their settings, and the file that keeps them


def status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB  # kB
    raise KeyError(field)


@contextmanager
def peak_rise(out: dict, name: str):
    """out[name] = the highest resident memory reached inside the block minus the resident memory at its start;
    out[name + '_kept'] = the resident memory after it minus that at its start."""
    gc.collect()
    start = status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
    yield
    out[name] = status_gib("VmHWM") - start
    gc.collect()
    out[name + "_kept"] = status_gib("VmRSS") - start  # what stays after the block


def qwen_shaped_model(layers: int, vocab: int = 151936):
    """Qwen2.5-0.5B's config with `layers` decoder layers, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(hidden_size=896, num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=vocab, rope_theta=1e6, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu",
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)  # token 0 pads the random batches
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def random_batch(rows: int, tokens: int, vocab: int = 151936):
    import torch

    import vineppo
    ids = torch.randint(1, vocab, (rows, PROMPT + tokens)).tolist()
    return vineppo.collate([r[:PROMPT] for r in ids], [r[PROMPT:] for r in ids], pad_id=0)


def case_fixed() -> dict:
    """Weights, gradients and AdamW states of the full-depth policy and critic, and the reference's weights."""
    import copy

    import torch

    import vineppo
    out, mb = {}, random_batch(1, 8)
    with peak_rise(out, "policy_weights"):
        policy = qwen_shaped_model(LAYERS)
    assert sum(p.numel() for p in policy.parameters()) == 494_032_768
    with peak_rise(out, "policy_grads"):
        vineppo.response_logprobs(policy, mb, 1.0).sum().backward()
    optimizers = [torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)]
    with peak_rise(out, "policy_adam"):  # the first step allocates the two states; `_kept` = the states
        optimizers[0].step()
    optimizers.clear()
    policy.zero_grad(set_to_none=True)
    with peak_rise(out, "reference_weights"):
        reference = copy.deepcopy(policy).requires_grad_(False)
    del reference
    with peak_rise(out, "critic_weights"):
        critic = vineppo.ValueNetwork.from_policy(policy)
    del policy
    with peak_rise(out, "critic_grads"):
        vineppo.response_values(critic, mb).sum().backward()
    optimizers.append(torch.optim.AdamW(critic.parameters(), lr=1e-6, weight_decay=0.0))
    with peak_rise(out, "critic_adam"):
        optimizers[0].step()
    return out


def case_phases(layers: int, rows: int, tokens: int, chunked: bool, checkpointing: bool, vocab: int) -> dict:
    """Peak rises of precompute, one policy micro-batch of the update and (critic) the critic's micro-batch."""
    import copy

    import torch

    import vineppo
    if not chunked:
        vineppo.LOGITS_CHUNK_BYTES = 2**62  # the full logits at once, as before the chunked LM head
    policy = qwen_shaped_model(layers, vocab)
    if checkpointing:
        vineppo.enable_gradient_checkpointing(policy)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value_model = vineppo.ValueNetwork.from_policy(policy)
    batch = random_batch(rows, tokens, vocab)
    args = vineppo.Args(micro_batch_size=rows, minibatch_size=rows, gradient_checkpointing=checkpointing)
    device, out = torch.device("cpu"), {}
    with peak_rise(out, "precompute"):
        fixed = vineppo.precompute(policy, reference, None, batch, args, device)
    del reference
    advantages = torch.randn_like(batch["response_mask"])
    policy.train(checkpointing)
    start = time.time()
    with peak_rise(out, "update_policy"):
        vineppo.minibatch_backward(policy, None, batch, fixed, advantages, None, torch.arange(rows), args, device)
    out["update_policy_s"] = time.time() - start
    value_model.train(checkpointing)  # the critic's micro-batch, while the policy's gradients are still held
    mb = vineppo.slice_batch(batch, torch.arange(rows), device)
    with peak_rise(out, "update_critic"):
        values = vineppo.response_values(value_model, mb)  # [rows, T]
        vineppo.value_loss(values, values.detach() + 0.1, torch.ones_like(values), mb["response_mask"],
                           0.2).sum().backward()
    return out


def case_sampling(layers: int, vocab: int = 151936) -> dict:
    import torch

    import vineppo
    model = qwen_shaped_model(layers, vocab)
    prefixes = torch.randint(1, vocab, (28, 1120)).tolist()
    prefixes = [prefixes[i % 28] for i in range(256)]  # 9 rows per distinct prefix, 256 rows, one generate call
    out = {}
    torch.manual_seed(0)
    with peak_rise(out, "sampling"), torch.inference_mode():
        vineppo.sample_continuations(model, prefixes, [32] * 256, eos_id=0, pad_id=0, temperature=0.6,
                                     top_p=0.9, batch_size=256, progress=False)
    return out


def run_case(case: dict, **more) -> dict:
    """One case in a fresh subprocess (its own peak), fixed malloc thresholds; returns its measurements (and
    keeps them in --results, so a rerun reuses the cases measured already)."""
    case = dict(case, **more)
    key = json.dumps(case, sort_keys=True)
    if key in RESULTS:
        print(f"  measured {case}: {', '.join(f'{k} {v:.2f}' for k, v in RESULTS[key].items())} (from --results)")
        return RESULTS[key]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        sys.exit(f"case {case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    RESULTS[key] = result
    if RESULTS_PATH:
        Path(RESULTS_PATH).write_text(json.dumps(RESULTS, indent=1))
    print(f"  measured {case}: {', '.join(f'{k} {v:.2f}' for k, v in result.items())} ({time.time() - start:.0f} s)",
          flush=True)
    return result


def fit(at1: float, at2: float) -> float:
    """24 layers from 1 and 2: (phase at one layer) + 23 x (what one more layer adds)."""
    return at1 + (LAYERS - 1) * (at2 - at1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="", help="rows x tokens to measure, e.g. 8x1024,4x512 (default: the table's)")
    parser.add_argument("--results", default="", help="a JSON file that keeps every measured case: a rerun reuses them")
    options = parser.parse_args()
    if options.case:
        import torch

        import vineppo
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        vineppo.BF16_ON_CPU = True  # the CUDA precision path: forward passes under bf16 autocast
        case = json.loads(options.case)
        kind = case.pop("kind")
        result = {"fixed": case_fixed, "phases": case_phases, "sampling": case_sampling}[kind](**case)
        print(json.dumps(result))
        return
    global RESULTS_PATH
    RESULTS_PATH = options.results
    if RESULTS_PATH and Path(RESULTS_PATH).exists():
        RESULTS.update(json.loads(Path(RESULTS_PATH).read_text()))
    shapes = [tuple(map(int, s.split("x"))) for s in options.shapes.split(",")] if options.shapes else UPDATE_SHAPES
    print("fixed parts (24 layers):", flush=True)
    fixed = run_case({"kind": "fixed"})
    phases = functools.partial(run_case, {"kind": "phases", "checkpointing": False})
    print("at one layer, the real vocabulary (chunked LM head; sampling):", flush=True)
    one_layer = {(rows, tokens): phases(layers=1, rows=rows, tokens=tokens, chunked=True, vocab=151936)
                 for rows, tokens in shapes}
    one_layer["sampling"] = run_case({"kind": "sampling", "layers": 1})
    print("at one layer, the real vocabulary, the full logits at once (as before the chunked LM head):", flush=True)
    full_logits = {(rows, tokens): phases(layers=1, rows=rows, tokens=tokens, chunked=False, vocab=151936)
                   for rows, tokens in BEFORE_SHAPES}
    print(f"what one more layer adds: depths 1 and 2 with a vocabulary of {SMALL_VOCAB} (the layers never see it):",
          flush=True)
    small = {}
    for rows, tokens, ckpt in [(r, t, c) for r, t in shapes for c in (False, True)] + [(r, t, False) for r, t in BEFORE_SHAPES]:
        small[rows, tokens, ckpt] = [phases(layers=d, rows=rows, tokens=tokens, chunked=True, checkpointing=ckpt,
                                            vocab=SMALL_VOCAB) for d in ((1, 2) if (rows, tokens) in shapes else (1,))]
    d1, d2 = (run_case({"kind": "sampling", "layers": d, "vocab": SMALL_VOCAB})["sampling"] for d in (1, 2))
    sampling = one_layer["sampling"]["sampling"] + (LAYERS - 1) * (d2 - d1)
    # 24 layers = the real vocabulary at one layer + 23 x (one more layer), checkpointing changing only the layers
    table = {(rows, tokens, ckpt): {k: one_layer[rows, tokens][k] - small[rows, tokens, False][0][k]
                                    + fit(small[rows, tokens, ckpt][0][k], small[rows, tokens, ckpt][1][k]) for k in PHASES}
             for rows, tokens in shapes for ckpt in (False, True)}
    # before: the full logits' rise at one layer above the layers' own (small vocabulary), a line in rows x tokens
    extra = {rows * tokens: {k: full_logits[rows, tokens][k] - small[rows, tokens, False][0][k] for k in PHASES}
             for rows, tokens in BEFORE_SHAPES}
    report(fixed, sampling, table, extra, small)


def report(fixed: dict, sampling: float, table: dict, extra: dict, small: dict) -> None:
    f = fixed
    (x1, e1), (x2, e2) = sorted(extra.items())

    def before(phases: dict, rows: int, tokens: int, ckpt: bool, phase: str) -> float:
        """The layers' part (small vocabulary, 24 layers) + the full logits' rise, a line in rows x tokens."""
        layers = fit(small[rows, tokens, ckpt][0][phase], small[rows, tokens, ckpt][1][phase])
        return layers + e1[phase] + (e2[phase] - e1[phase]) * (rows * tokens - x1) / (x2 - x1)
    held = {"mc": f["policy_weights_kept"] + f["policy_adam_kept"] + f["reference_weights_kept"]}
    held["value"] = held["mc"] + f["critic_weights_kept"] + f["critic_adam_kept"]
    steps = {"mc": f["policy_grads_kept"] + f["policy_adam"] - f["policy_adam_kept"]}  # gradients + AdamW's temporaries
    steps["value"] = steps["mc"] + f["critic_grads_kept"]  # the two steps run one after the other: one's temporaries
    print(f"\nheld all along, GiB: policy weights {f['policy_weights_kept']:.2f} + AdamW states {f['policy_adam_kept']:.2f}, "
          f"reference {f['reference_weights_kept']:.2f}; critic weights {f['critic_weights_kept']:.2f} + AdamW states "
          f"{f['critic_adam_kept']:.2f}. Gradients {f['policy_grads_kept']:.2f} (critic {f['critic_grads_kept']:.2f}), "
          f"AdamW step's temporaries {f['policy_adam'] - f['policy_adam_kept']:.2f}")
    print(f"sampling, 256 rows up to 1,152 tokens: {sampling:.2f} GiB above the weights")
    print("\nphases of one micro-batch at 24 layers, GiB above what is held (before: the full logits at once;")
    print("after: the chunked LM head). Totals: held + the largest phase, or + the optimizer step")
    print(f"{'rows x tokens':>13} {'ckpt':>4} | {'precompute':>10} {'before':>7} | {'update':>6} {'before':>7} {'ratio':>5}"
          f" | {'critic':>6} | {'mc/grpo':>7} {'before':>7} {'value':>6} {'before':>7}")
    totals = {}
    for (rows, tokens, ckpt), p in sorted(table.items()):
        old = {k: before(p, rows, tokens, ckpt, k) for k in ("precompute", "update_policy")}
        star = " " if (rows, tokens) in BEFORE_SHAPES else "*"
        for name, phases in (("after", p), ("before", {**p, **old})):
            mc = held["mc"] + max(sampling, phases["precompute"], phases["update_policy"], steps["mc"])
            value = held["value"] + max(sampling, phases["precompute"], phases["update_policy"], steps["value"],
                                        f["policy_grads_kept"] + phases["update_critic"])
            totals[rows, tokens, ckpt, name] = {"mc": mc, "value": value}
        t, o = totals[rows, tokens, ckpt, "after"], totals[rows, tokens, ckpt, "before"]
        print(f"{rows:>5} x {tokens:<5} {'yes' if ckpt else 'no':>4} | {p['precompute']:>10.2f} {old['precompute']:>6.2f}{star} | "
              f"{p['update_policy']:>6.2f} {old['update_policy']:>6.2f}{star} {old['update_policy'] / p['update_policy']:>4.1f}x"
              f" | {p['update_critic']:>6.2f} | {t['mc']:>7.1f} {o['mc']:>7.1f} {t['value']:>6.1f} {o['value']:>7.1f}")
    print(f"* extrapolated: the full logits' extra measured at 1 layer at {' and '.join(f'{r} x {t}' for r, t in BEFORE_SHAPES)}, "
          "a line in rows x tokens")
    for ckpt in (False, True):
        if (8, 1024, ckpt) in table:
            after, old = table[8, 1024, ckpt]["update_policy"], before(table[8, 1024, ckpt], 8, 1024, ckpt, "update_policy")
            t = totals[8, 1024, ckpt, "after"], totals[8, 1024, ckpt, "before"]
            print(f"micro-batch 8 x 1,024 response tokens, {'with' if ckpt else 'no'} checkpointing: one update micro-batch "
                  f"{old:.1f} GiB before* -> {after:.1f} GiB after ({old / after:.1f}x less); totals mc {t[1]['mc']:.1f} -> "
                  f"{t[0]['mc']:.1f}, value {t[1]['value']:.1f} -> {t[0]['value']:.1f} GiB")
    slack = "(totals + 15% allocator slack + 0.5 GiB CUDA context, in GB of 10^9 bytes)"
    print(f"\nlargest measured micro-batch at 1,024 response tokens that fits a card {slack}; without gradient")
    print("checkpointing where it fits (faster); --offload-reference subtracts the reference's weights")
    for card in CARDS_GB:
        picks = []
        for critic in ("mc", "value"):
            fits = [(ckpt, rows, offload) for (rows, tokens, ckpt, name), t in totals.items()
                    if name == "after" and tokens == 1024 for offload in (False, True)
                    if ((t[critic] - offload * f["reference_weights_kept"]) * 1.15 + 0.5) * GIB / 1e9 <= card]
            best = max(fits, key=lambda x: (not x[0], x[1], not x[2]), default=None)
            picks.append(f"{critic}: " + ("none fits" if best is None else f"--micro-batch-size {best[1]}"
                         + " --gradient-checkpointing" * best[0] + " --offload-reference" * best[2]))
        print(f"  {card} GB: {'; '.join(picks)} (grpo as mc)")


if __name__ == "__main__":
    main()
