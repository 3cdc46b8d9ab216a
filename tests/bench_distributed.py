"""Benchmark: `torchrun` data parallel on this CPU (not a test; pytest skips it).

    python tests/bench_distributed.py               # SFT once (the demo's, ~4 minutes), then 3 runs of 6 iterations
    python tests/bench_distributed.py --iterations 3 --model runs/arith-mc-seed0/final   # a saved SFT model

From one SFT'd demo model it runs the same RL (VinePPO, the demo's settings) three ways and prints the seconds of
each phase per iteration:
- 1 process with 2 threads (`python vineppo.py`, OMP_NUM_THREADS=2);
- 2 ranks with 1 thread each (`torchrun --nproc-per-node 2 vineppo.py`, OMP_NUM_THREADS=1), as shipped: MC
  states deduplicated across the ranks and re-sharded evenly;
- the same 2 ranks with each rank rolling out only its own responses' states (no re-sharding).
and, for the 2-rank runs, the generated tokens of the busiest rank over the mean (`balance/busiest_rank_tokens`,
1.0 is perfect balance). On a CPU the 2 ranks share the cores that the single process used: the ratio tells
what the communication and the imbalance cost, not what a second GPU gains (that is ~2x minus the same costs).
The figures move with the CPU, the thread count and what else runs on the machine.

Measured on an idle 2-core CPU (6 iterations, s per iteration): 1 process x 2 threads 11.48; 2 ranks re-sharded
10.40 (1.10x, balance 1.018); 2 ranks, own states only 9.40 (1.22x, balance 1.035). The arithmetic task's
responses are of even length, so there is little imbalance for re-sharding to remove, and it costs a gather.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "credit", "update", "eval")


def worker(argv: list[str]) -> None:
    """Run under torchrun: vineppo.main, optionally with each rank valuing only its own states."""
    sys.path.insert(0, str(ROOT))
    import vineppo
    if "--no-reshard" in argv:
        argv.remove("--no-reshard")
        original = vineppo.assign_mc_advantages

        def own_states_only(*args, **kwargs):
            saved = vineppo.every_rank, vineppo.rank_shard_rollouts
            vineppo.every_rank, vineppo.rank_shard_rollouts = (lambda items: items), (lambda rollout: rollout)
            try:
                return original(*args, **kwargs)
            finally:
                vineppo.every_rank, vineppo.rank_shard_rollouts = saved
        vineppo.assign_mc_advantages = own_states_only
    vineppo.main(argv)


def launch(command: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # its progress bars are not shown; its error is
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    out = {phase: sum(r.get(f"time/{phase}_s", 0.0) for r in records) / len(records) for phase in PHASES}
    out["iteration"] = sum(out.values())
    balance = [r["balance/busiest_rank_tokens"] for r in records if "balance/busiest_rank_tokens" in r]
    out["balance"] = sum(balance) / len(balance) if balance else float("nan")
    return out


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="an SFT'd model directory (default: SFT the demo model once)")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", default="runs/bench-distributed")
    options = parser.parse_args()
    out = Path(options.out)
    model = options.model or str(out / "sft" / "final")
    if not Path(model).is_dir():
        print("SFT of the demo model (once) ...", flush=True)
        launch([sys.executable, str(ROOT / "vineppo.py"), "--iterations", "0", "--output-dir", str(out / "sft"),
                "--overwrite"], threads=2)
    flags = ["--model", model, "--sft-epochs", "0", "--iterations", str(options.iterations), "--eval-every", "1000",
             "--overwrite", *[f for key, value in [("task", "arith"), ("lr", "5e-5"), ("prompts-per-iteration", "32"),
                                                    ("minibatch-size", "128"), ("micro-batch-size", "64"),
                                                    ("mc-rollouts", "4"), ("max-new-tokens", "80"),
                                                    ("eval-problems", "256"), ("eval-samples", "4")]
                              for f in (f"--{key}", value)]]  # the demo's settings (TINY_DEMO_OVERRIDES)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__, "--worker"]
    ways = {"1 process x 2 threads": ([sys.executable, str(ROOT / "vineppo.py")], 2),
            "2 ranks x 1 thread, re-sharded": (torchrun, 1),
            "2 ranks x 1 thread, own states only": (torchrun + ["--no-reshard"], 1)}
    results = {}
    for name, (command, threads) in ways.items():
        run_dir = out / name.split(",")[-1].strip().replace(" ", "-")
        print(f"{name} ...", flush=True)
        launch(command + flags + ["--output-dir", str(run_dir)], threads)
        results[name] = summary(run_dir)
    base = results["1 process x 2 threads"]
    print(f"\nseconds per iteration (mean of {options.iterations}; eval: before and after RL only)")
    print(f"{'way':38s}" + "".join(f"{p:>10s}" for p in (*PHASES, "iteration")) + "   vs 1 process   balance")
    for name, r in results.items():
        print(f"{name:38s}" + "".join(f"{r[p]:10.2f}" for p in (*PHASES, "iteration"))
              + f"   {base['iteration'] / r['iteration']:10.2f}x   {r['balance']:7.3f}")


if __name__ == "__main__":
    main()
