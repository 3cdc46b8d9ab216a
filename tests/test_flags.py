"""The command line is a contract: the method's knobs are declared in Part I (`MethodArgs`) and the run options in
Part II (`Args` extends it), yet every flag and default stays what users, scripts and checkpoints know."""

import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vineppo  # noqa: E402
from test_training import TINY_RUN  # noqa: E402

# Every flag with its default, in the order `--help` listed them when all were one dataclass (taken before the
# run options moved behind the fence). A checkpoint stores its settings as this dict (`asdict(args)`).
FLAGS_BEFORE = [
    ("model", "tiny"), ("task", "auto"), ("dataset_path", ""), ("validation_size", -1), ("critic", "mc"),
    ("mc_rollouts", 9), ("iterations", -1), ("seed", 0), ("output_dir", ""), ("overwrite", False),
    ("save_every", 10), ("resume", ""), ("max_nonfinite_steps", 3), ("device", "auto"), ("dist_timeout", 600),
    ("prompts_per_iteration", 64), ("samples_per_prompt", 8), ("temperature", 0.6), ("top_p", 0.9),
    ("max_new_tokens", 1024), ("step_split", "line"), ("step_chunk_tokens", 8), ("max_states_per_response", -1),
    ("rollout_batch_size", 256), ("gradient_checkpointing", False), ("offload_reference", False), ("epochs", 2),
    ("minibatch_size", 64), ("micro_batch_size", 16), ("lr", 1e-6), ("warmup_ratio", 0.03), ("max_grad_norm", 1.0),
    ("clip_range", 0.2), ("kl_coef", 1e-4), ("value_lr", -1), ("value_clip_range", 0.2), ("critic_warmup", 0),
    ("gamma", 1.0), ("gae_lambda", 1.0), ("sft_epochs", 2.0), ("sft_lr", 1e-5), ("sft_batch_size", 64),
    ("eval_every", 10), ("eval_problems", 0), ("eval_samples", 16), ("eval_temperature", 0.35), ("show_credit", 0),
    ("train_problems", 4000), ("test_problems", 500), ("chain_length", "4-6"), ("slip_kinds", "mul,carry,borrow"),
    ("slip_rate", 0.3),
]

FLAGS_ADDED = [("report_to", "none"), ("run_name", ""), ("eval_train_problems", 0), ("step_forms", 1)]  # options added since, at the end of --help


def help_flags() -> dict[str, str]:
    """flag -> the default its `--help` line prints ('' for on/off flags and --resume, which print none)."""
    parser = vineppo.dataclass_parser(vineppo.Args, "", alone={"resume": "latest"})
    flags = {}
    for action in parser._actions:
        default = re.search(r"\(default: ([^()]*)\)$", action.help or "")
        flags[action.option_strings[-1]] = default.group(1) if default else ""
    return flags


def test_help_lists_the_same_flags_with_the_same_defaults():
    expected = {"--" + name.replace("_", "-"): "" if isinstance(value, bool) or name == "resume" else repr(value)
                for name, value in FLAGS_BEFORE + FLAGS_ADDED}
    assert help_flags() == {"--help": "", **expected}
    parsed = vineppo.Args()
    assert {name: getattr(parsed, name) for name, _ in FLAGS_BEFORE + FLAGS_ADDED} == dict(FLAGS_BEFORE + FLAGS_ADDED)


def test_help_shows_the_method_first_then_the_run():
    text = vineppo.dataclass_parser(vineppo.Args, "").format_help().split("options:")[1]  # past the usage line
    method, run = text.index("The method's knobs"), text.index("The run's options")
    assert method < text.index("--mc-rollouts") < text.index("--kl-coef") < run < text.index("--output-dir")
    assert run < text.index("--eval-every") and run < text.index("--device")


def test_part_one_declares_only_the_method_and_every_field_is_in_one_object():
    source = (ROOT / "vineppo.py").read_text().splitlines()
    banner = {name: next(i for i, line in enumerate(source) if line.startswith(f"# PART {name}")) for name in ("I:", "II")}
    method_line = next(i for i, line in enumerate(source) if line.startswith("class MethodArgs"))
    run_line = next(i for i, line in enumerate(source) if line.startswith("class Args(MethodArgs)"))
    assert banner["I:"] < method_line < banner["II"] < run_line
    method = {f.name for f in vineppo.fields(vineppo.MethodArgs)}
    run_options = {f.name for f in vineppo.fields(vineppo.Args)} - method
    assert {"mc_rollouts", "temperature", "clip_range", "kl_coef", "gamma", "gae_lambda", "sft_epochs"} <= method
    assert {"output_dir", "device", "micro_batch_size", "eval_samples", "chain_length", "seed"} <= run_options
    assert [f.name for f in vineppo.fields(vineppo.Args)][:len(method)] == [f.name for f in vineppo.fields(vineppo.MethodArgs)]


def test_a_checkpoint_written_before_the_move_resumes(tmp_path):
    """Before the move a checkpoint's settings were `asdict` of one dataclass, in FLAGS_BEFORE's order; the names
    are the same since, so such a checkpoint (the order restored, the options added since left out: they take
    their defaults) must resume and finish."""
    out = tmp_path / "run"
    vineppo.main(TINY_RUN + ["--iterations", "1", "--output-dir", str(out)])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["args"]) == {name for name, _ in FLAGS_BEFORE + FLAGS_ADDED}
    checkpoint["args"] = {name: checkpoint["args"][name] for name, _ in FLAGS_BEFORE}
    torch.save(checkpoint, out / "checkpoint.pt")
    result = vineppo.main(["--output-dir", str(out), "--resume", "--iterations", "2"])
    assert [r["iteration"] for r in vineppo.read_metrics(str(out))] == [0, 1, 2]
    saved = json.loads((out / "final" / "args.json").read_text())
    assert saved == {**checkpoint["args"], "iterations": 2, "resume": str(out / "checkpoint.pt"),
                     **dict(FLAGS_ADDED)} and len(result["history"]) == 2
