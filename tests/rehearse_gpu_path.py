"""CPU rehearsal of vineppo.py's CUDA code path (not a test: pytest does not collect it; not a GPU measurement).

vineppo.py has not been run on a GPU yet. This script runs, on the CPU, what a first GPU run of Qwen2.5-0.5B
runs: one iteration of each critic (mc, value, grpo) through `vineppo.main`, with a model of Qwen2.5-0.5B's
exact architecture (494,032,768 parameters, random weights from the config), the real Qwen2.5 tokenizer when
../shared/qwen2.5-tokenizer/ exists (else `vineppo.build_tiny_tokenizer()`), a local GSM8K-format file,
2 prompts x 2 samples, K = 2, 32 new tokens, and every forward pass under bf16 autocast by the same
`vineppo.autocast` that CUDA uses (`vineppo.BF16_ON_CPU = True` turns it on for the CPU).

    OMP_NUM_THREADS=2 python tests/rehearse_gpu_path.py     # ~18 minutes on 2 CPU cores; 20 GiB RAM (value)

Each critic runs in its own subprocess, so each peak memory is its own. For each critic it prints seconds per
phase, the peak resident memory (VmHWM), and the dtypes of every nn.Linear output during the run (all bf16 =
the autocast path really ran). It exits 1 if a critic fails, a metric is not finite, an optimizer step was
skipped for a non-finite loss, or a forward pass ran in fp32. A random model never writes EOS, so every
response is cut at 32 tokens and gets reward 0: this checks that the path runs, not that it learns.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: no hub is needed here
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # vineppo.py, imported by the subprocesses
QWEN_TOKENIZER = ROOT.parent / "shared" / "qwen2.5-tokenizer"
CRITICS = ["mc", "value", "grpo"]
PHASES = ["load", "eval_before", "rollout", "credit", "update", "eval_after", "checkpoints", "final_save", "other"]
GSM8K_ROWS = [  # (question, answer) in GSM8K's format: reasoning lines, then "#### <number>"
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
     "clips did Natalia sell altogether in April and May?", "Natalia sold 48/2 = 24 clips in May.\n"
     "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did "
     "she earn?", "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
     "It takes 2/2 = 1 bolt of white fiber.\nSo the total amount of fabric is 2+1 = 3 bolts.\n#### 3"),
    ("Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. She sells "
     "the rest for $2 per egg. How many dollars does she make every day?",
     "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18"),
]


def build_model_dir(path: str) -> None:
    """Qwen2.5-0.5B's architecture (its config.json) with random weights, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    import vineppo
    real = QWEN_TOKENIZER.is_dir()
    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER) if real else vineppo.build_tiny_tokenizer()
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, max_window_layers=24, hidden_act="silu",
                         use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 494_032_768, f"{n_params:,} parameters, not Qwen2.5-0.5B's 494,032,768"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"built {path}: {n_params:,} parameters, tokenizer {'Qwen2.5' if real else 'tiny'} "
          f"({len(tokenizer)} tokens)")


def rehearse(critic: str, work: str) -> dict:
    """One iteration of `critic` in bf16 autocast; returns its metric records, phase seconds, peak memory and
    the dtypes of every nn.Linear output."""
    import torch

    import vineppo
    vineppo.BF16_ON_CPU = True  # vineppo.autocast(cpu) now enables bf16 exactly as it does on cuda
    dtypes = Counter()  # dtype of each nn.Linear output: bf16 under autocast, fp32 outside it

    def record_dtype(module, args, output):
        if isinstance(module, torch.nn.Linear):
            dtypes[str(output.dtype)] += 1
    torch.nn.modules.module.register_module_forward_hook(record_dtype)  # on every module of the process
    seconds = Counter()
    for name, phase in [("load_model_and_tokenizer", "load"), ("save_checkpoint", "checkpoints"),
                        ("save_final", "final_save")]:  # Part II helpers, found by name at call time
        def timed(*args, _inner=getattr(vineppo, name), _phase=phase, **kwargs):
            start = time.time()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_phase] += time.time() - start
        setattr(vineppo, name, timed)
    out = os.path.join(work, f"run-{critic}")
    start = time.time()
    vineppo.main(["--model", os.path.join(work, "model"), "--task", "gsm8k", "--critic", critic,
                  "--dataset-path", f"{work}/train.jsonl,{work}/test.jsonl", "--validation-size", "0",
                  "--iterations", "1", "--prompts-per-iteration", "2", "--samples-per-prompt", "2",
                  "--mc-rollouts", "2", "--max-new-tokens", "32", "--minibatch-size", "4", "--micro-batch-size", "2",
                  "--sft-epochs", "0", "--eval-problems", "2", "--eval-samples", "1", "--device", "cpu",
                  "--output-dir", out, "--overwrite"])
    total = time.time() - start
    records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # the checkpoints hold GBs
    seconds.update(eval_before=records[0]["time/eval_s"], eval_after=records[-1]["time/eval_s"],
                   **{p: records[-1][f"time/{p}_s"] for p in ("rollout", "credit", "update")})
    seconds["other"] = total - sum(seconds.values())  # deep copies, optimizers, data, the loop's bookkeeping
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak_gib = int(status["VmHWM"].split()[0]) / 2**20  # kB -> GiB
    return {"records": records, "seconds": dict(seconds, total=total), "peak_gib": peak_gib, "dtypes": dtypes}


def problems(records: list[dict]) -> list[str]:
    """What makes a run fail the rehearsal: non-finite metrics or optimizer steps skipped as non-finite."""
    bad = [f"{key}={value} (iteration {r['iteration']})" for r in records for key, value in r.items()
           if isinstance(value, float) and not math.isfinite(value)]
    return bad + [f"{r['losses/nonfinite_steps']} non-finite steps" for r in records if r.get("losses/nonfinite_steps")]


def main() -> int:
    if sys.argv[1:2] == ["--build"]:
        build_model_dir(sys.argv[2])
        return 0
    if sys.argv[1:2] == ["--critic"]:  # a subprocess: one critic, its result as JSON for the parent
        critic, work = sys.argv[2], sys.argv[3]
        Path(work, f"result-{critic}.json").write_text(json.dumps(rehearse(critic, work)))
        return 0
    failed, results = [], {}
    with tempfile.TemporaryDirectory(prefix="rehearse-gpu-path-") as work:
        for split, rows in [("train", GSM8K_ROWS[:2]), ("test", GSM8K_ROWS[2:])]:
            lines = [json.dumps({"question": question, "answer": answer}) + "\n" for question, answer in rows]
            Path(work, f"{split}.jsonl").write_text("".join(lines))
        start = time.time()
        subprocess.run([sys.executable, __file__, "--build", os.path.join(work, "model")], check=True)
        print(f"model directory written in {time.time() - start:.0f}s", flush=True)
        for critic in CRITICS:
            print(f"\n=== critic {critic} ===", flush=True)
            if subprocess.run([sys.executable, __file__, "--critic", critic, work]).returncode != 0:
                failed.append(f"{critic}: the run failed (traceback above)")
                continue
            results[critic] = json.loads(Path(work, f"result-{critic}.json").read_text())
    print("\nseconds per phase (CPU, bf16 autocast; not a GPU measurement):")
    print(f"{'critic':8}" + "".join(f"{p:>12}" for p in PHASES + ["total"]) + f"{'peak RSS':>11}")
    for critic, result in results.items():
        print(f"{critic:8}" + "".join(f"{result['seconds'].get(p, 0.0):12.1f}" for p in PHASES + ["total"])
              + f"{result['peak_gib']:8.1f} GiB")
    for critic, result in results.items():
        last, n_floats = result["records"][-1], sum(isinstance(v, float) for r in result["records"] for v in r.values())
        print(f"{critic}: nn.Linear outputs {dict(result['dtypes'])} | reward {last['train/reward_mean']:.2f} "
              f"| pg {last['losses/policy_loss']:+.4f} kl {last['losses/kl']:.2e} | "
              f"{len(result['records'])} records, {n_floats} float metrics")
        failed += [f"{critic}: {problem}" for problem in problems(result["records"])]
        if set(result["dtypes"]) != {"torch.bfloat16"}:
            failed.append(f"{critic}: forward passes outside bf16 autocast: {dict(result['dtypes'])}")
    print("\n".join(["FAILED:"] + failed) if failed else "OK: every critic ran in bf16 with finite metrics")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
