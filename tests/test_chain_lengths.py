"""compare_critics.py --lengths: the task settings per chain length, the halfway point and the table's
aggregation on hand-made inputs, the skip/resume decision, and one tiny experiment run twice (the rerun
trains nothing) on shrunken demo settings."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compare_critics as cc  # noqa: E402
import vineppo  # noqa: E402


# ============================================================================================
# 1. Task settings per chain length
# ============================================================================================
def test_wrong_share_counts_solutions_whose_last_line_is_not_the_answer():
    problems = [{"solution": "\n2+3=5\n#### 5", "answer": "5"},
                {"solution": "\n2+3=6\n#### 6", "answer": "5"},  # a slip carried to the end
                {"solution": "\n2*3=6\n6+1=8\n#### 8", "answer": "7"},
                {"solution": "\n9-1=8\n#### 8", "answer": "8"}]
    assert cc.wrong_share(problems) == 0.5


def test_matched_slip_rate_holds_the_share_of_wrong_solutions():
    """The 4-6 chains at the demo's rate 0.3 give the target; a longer chain needs a lower rate per step to
    end wrong as often, and at the rate returned it does (to the task generator's own count)."""
    target = cc.wrong_share(vineppo.make_arith_task(0, 1000, 0, 0.3, "4-6")[0])
    assert 0.5 < target < 0.7
    assert cc.matched_slip_rate("4-6", target, n=1000) == pytest.approx(0.3, abs=0.01)
    long_rate = cc.matched_slip_rate("12-16", target, n=1000)
    assert long_rate < 0.2
    assert cc.wrong_share(vineppo.make_arith_task(0, 1000, 0, long_rate, "12-16")[0]) == pytest.approx(target, abs=0.01)
    assert cc.wrong_share(vineppo.make_arith_task(0, 1000, 0, 0.3, "12-16")[0]) > target + 0.2  # unmatched: far more


def test_length_settings_budget_and_argv():
    args = cc.parse_length_args([])
    settings = cc.length_settings(args)
    assert [s["chain_length"] for s in settings] == ["4-6", "8-10", "12-16"]
    assert [s["max_new_tokens"] for s in settings] == [80, 120, 192]  # 12 tokens an operation, at least 80
    assert [s["slip_rate"] for s in settings] == [0.3, 0.178, 0.122]  # the README's table was run with these
    first = vineppo.parse_args(cc.sft_argv(0, settings, args))
    assert (first.model, first.sft_epochs, first.iterations, first.chain_length) == ("tiny", 10.4, 0, "4-6")
    later = vineppo.parse_args(cc.sft_argv(2, settings, args))
    assert later.model == os.path.join(args.output_dir, "sft-8-10", "final")  # continues the previous length
    assert (later.sft_epochs, later.chain_length, later.max_new_tokens, later.slip_rate) == (4, "12-16", 192, 0.122)
    assert (later.sft_lr, later.eval_problems) == (3e-3, 256)  # the demo's, typed since the model is not `tiny`
    runs = [vineppo.parse_args(cc.rl_argv(2, "1", critic, settings, args)) for critic in ("mc", "value", "grpo")]
    for run, critic in zip(runs, ("mc", "value", "grpo")):
        assert (run.critic, run.seed, run.sft_epochs, run.iterations, run.eval_problems) == (critic, 1, 0, 10, 128)
        assert run.model == os.path.join(args.output_dir, "sft-12-16", "final")
        assert run.output_dir == os.path.join(args.output_dir, "12-16", f"{critic}-seed1")
    same = [{k: v for k, v in vars(r).items() if k not in ("critic", "output_dir")} for r in runs]
    assert same[0] == same[1] == same[2]  # only the critic differs between methods
    assert (runs[0].lr, runs[0].mc_rollouts, runs[0].value_lr, runs[0].critic_warmup) == (5e-5, 4, 2e-3, 8)


@pytest.mark.parametrize("flags, message", [
    (["--chain-lengths", "4-6,x"], "--chain-lengths"), (["--sft-epochs=-1,4"], "--sft-epochs"),
    (["--sft-epochs=-1,-1,4"], "--sft-epochs"), (["--critics", "mc,ppo"], "--critics"),
    (["--seeds", "0,a"], "--seeds"), (["--iterations", "0"], "--iterations")])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cc.parse_length_args(flags)
    assert message in str(stop.value) and "\n" not in str(stop.value)


# ============================================================================================
# 2. Aggregation by chain length
# ============================================================================================
def records(curve, *, seconds_per_iteration=10.0, tokens=100, warmup_s=None):
    """Metrics of a run evaluated at every iteration in `curve` ({iteration: pass@1}), one record each."""
    out = []
    for iteration in range(max(curve) + 1):
        r = {"iteration": iteration, "time/elapsed_s": seconds_per_iteration * iteration}
        r.update({"tokens/rollout": tokens} if iteration else {})
        if iteration in curve:
            r["eval/pass@1"] = curve[iteration]
        out.append(r)
    if warmup_s is not None:
        out[0]["time/critic_warmup_s"] = warmup_s
    return out


def test_halfway_is_the_first_evaluation_past_half_the_way():
    curve = records({0: 0.5, 2: 0.6, 4: 0.7, 6: 0.9}, warmup_s=5.0)
    assert cc.halfway(curve, 0.9) == {"iteration": 4, "seconds": 45.0, "tokens": 400}  # 0.7 >= 0.5 + 0.4 / 2
    assert cc.halfway(curve, 0.8)["iteration"] == 4  # needs 0.65: 0.6 at iteration 2 is short of it
    assert cc.halfway(curve, 0.7)["iteration"] == 2  # needs 0.6
    assert cc.halfway(records({0: 0.5, 2: 0.55}), 0.9) is None  # never reached
    assert cc.halfway(records({0: 0.5, 1: 0.6}), 0.5) is None  # no way to go: the best is the start
    assert cc.halfway(records({0: 0.5, 1: 0.6}), 0.45) is None


def test_halfway_threshold_is_inclusive_and_uses_the_runs_own_start():
    assert cc.halfway(records({0: 0.4, 1: 0.6, 2: 0.8}), 0.8)["iteration"] == 1  # 0.6 = 0.4 + 0.4 / 2
    assert cc.halfway(records({0: 0.6, 1: 0.65, 2: 0.7}), 0.8)["iteration"] == 2  # from 0.6: needs 0.7


def run(length, critic, seed, before, after, ev=None, curve=None):
    return {"chain_length": length, "critic": critic, "seed": seed, "before": before, "after": after,
            "credit_ev": ev, "tokens": 1000.0, "records": records(curve or {0: before, 2: after})}


def test_aggregate_means_paired_leads_and_halfway_by_hand():
    runs = [run("4-6", "mc", "0", 0.5, 0.8, ev=0.6), run("4-6", "grpo", "0", 0.5, 0.7),
            run("4-6", "mc", "1", 0.4, 0.6, ev=0.4, curve={0: 0.4, 1: 0.45, 2: 0.6}), run("4-6", "grpo", "1", 0.4, 0.7),
            run("8-10", "mc", "0", 0.3, 0.5, ev=0.5), run("8-10", "grpo", "0", 0.3, 0.35)]
    rows = {(r["chain_length"], r["critic"]): r for r in cc.aggregate(runs, ["mc", "grpo"])}
    assert list(rows) == [("4-6", "mc"), ("4-6", "grpo"), ("8-10", "mc"), ("8-10", "grpo")]
    mc = rows[("4-6", "mc")]
    assert mc["gain"][0] == pytest.approx(0.25) and mc["gain"][1] == pytest.approx(math.sqrt(2 * 0.05 ** 2))
    assert mc["before"] == pytest.approx((0.45, math.sqrt(2 * 0.05 ** 2)))
    assert mc["credit_ev"] == pytest.approx((0.5, math.sqrt(2 * 0.1 ** 2)))
    assert mc["lead"] is None  # the first critic is what the others are subtracted from
    grpo = rows[("4-6", "grpo")]
    assert grpo["credit_ev"] is None
    assert grpo["lead"][0] == pytest.approx(((0.3 - 0.2) + (0.2 - 0.3)) / 2)  # paired by seed: +0.1 and -0.1
    assert grpo["lead"][1] == pytest.approx(math.sqrt(2 * 0.1 ** 2))
    assert rows[("8-10", "grpo")]["lead"] == pytest.approx((0.15, 0.0))  # one seed: no spread
    # halfway to the best final pass@1 of the seed: seed 1's best is 0.7 (grpo), so mc needs 0.55
    assert mc["halfway"]["iteration"] == pytest.approx((2.0, 0.0)) and mc["halfway_reached"] == (2, 2)
    # seed 0, 8-10: best 0.5; grpo needs 0.4 and ends at 0.35: not reached
    assert rows[("8-10", "grpo")]["halfway"] is None and rows[("8-10", "grpo")]["halfway_reached"] == (0, 1)


def test_aggregate_lead_pairs_by_seed_when_a_method_misses_one():
    """grpo has no seed-0 run: the lead pairs mc's seed 1 and 2 with grpo's, never mc's seed 0 with grpo's seed 1.
    The gains differ by seed so that pairing by position gives another lead; value misses a seed of mc's too."""
    runs = [run("4-6", "mc", "0", 0.5, 0.6), run("4-6", "mc", "1", 0.5, 0.9), run("4-6", "mc", "2", 0.5, 0.7),
            run("4-6", "grpo", "1", 0.5, 0.6), run("4-6", "grpo", "2", 0.5, 0.7),
            run("4-6", "value", "0", 0.5, 0.5), run("4-6", "value", "2", 0.5, 0.6)]
    rows = {r["critic"]: r for r in cc.aggregate(runs, ["mc", "grpo", "value"])}
    assert rows["grpo"]["seeds"] == ["1", "2"]
    assert rows["grpo"]["lead"] == pytest.approx((0.15, math.sqrt(2 * 0.15 ** 2)))  # seed 1: +0.3, seed 2: 0.0
    assert rows["value"]["lead"] == pytest.approx((0.1, 0.0))  # seed 0: +0.1, seed 2: +0.1


def test_aggregate_halfway_targets_the_runs_own_seed():
    """Seed 0 ends far higher (0.9) than seed 1 (0.6): seed 1's runs aim at 0.6, halfway 0.5, and reach it;
    aiming at seed 0's 0.9 (halfway 0.65) neither would."""
    runs = [run("4-6", "mc", "0", 0.5, 0.9), run("4-6", "grpo", "0", 0.5, 0.6),
            run("4-6", "mc", "1", 0.4, 0.6, curve={0: 0.4, 1: 0.5, 2: 0.6}),
            run("4-6", "grpo", "1", 0.4, 0.5, curve={0: 0.4, 1: 0.45, 2: 0.5})]
    rows = {r["critic"]: r for r in cc.aggregate(runs, ["mc", "grpo"])}
    assert rows["mc"]["halfway"]["iteration"] == pytest.approx((1.5, math.sqrt(0.5)))  # seed 0 at 2, seed 1 at 1
    assert rows["mc"]["halfway_reached"] == (2, 2)
    assert rows["grpo"]["halfway"]["iteration"] == pytest.approx((2.0, 0.0))  # seed 0 needs 0.7: not reached
    assert rows["grpo"]["halfway_reached"] == (1, 2)


def test_aggregate_halfway_when_no_method_gained():
    runs = [run("12-16", "mc", "0", 0.9, 0.88, curve={0: 0.9, 2: 0.95, 4: 0.88}), run("12-16", "grpo", "0", 0.9, 0.85),
            run("12-16", "mc", "1", 0.8, 0.9), run("12-16", "grpo", "1", 0.8, 0.82)]
    rows = cc.aggregate(runs, ["mc", "grpo"])
    assert rows[0]["halfway_reached"] == (1, 1)  # seed 0 had nothing to reach (best 0.88 < 0.9), seed 1 did
    assert rows[0]["halfway"]["iteration"] == (2.0, 0.0)
    assert rows[1]["halfway"] is None and rows[1]["halfway_reached"] == (0, 1)  # grpo seed 1: 0.82 < 0.85


def test_aggregate_skips_a_critic_with_no_finished_run():
    rows = cc.aggregate([run("4-6", "grpo", "0", 0.5, 0.7)], ["mc", "grpo"])
    assert [r["critic"] for r in rows] == ["grpo"] and rows[0]["lead"] is None  # no mc run to pair with


def test_mean_std_is_the_sample_std():
    assert cc.mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert cc.mean_std([0.25]) == (0.25, 0.0)


# ============================================================================================
# 3. Skip, resume, refuse
# ============================================================================================
def test_run_state_new_resume_done_and_refused(tmp_path):
    out = str(tmp_path / "run")
    argv = ["--iterations", "3", "--chain-length", "8-10", "--output-dir", out]
    assert cc.run_state(argv, out) == "new"
    os.makedirs(os.path.join(out, "final"))
    assert cc.run_state(argv, out) == "new"  # a final/ without its settings file is not a finished run
    Path(out, "checkpoint.pt").write_bytes(b"")
    assert cc.run_state(argv, out) == "resume"
    saved = vars(vineppo.parse_args(argv))
    Path(out, "final", "args.json").write_text(json.dumps({**saved, "device": "cuda", "overwrite": True}))
    assert cc.run_state(argv, out) == "done"  # device and overwrite do not change what a run computes
    Path(out, "final", "args.json").write_text(json.dumps({**saved, "slip_rate": 0.5}))
    with pytest.raises(SystemExit) as stop:
        cc.run_state(argv, out)
    assert "other settings (slip_rate)" in str(stop.value)


def finish_by_hand(argv, run_dir, curve):
    """A finished run as vineppo.py leaves it, for the report: final/args.json (the settings argv gives) and
    metrics.jsonl, evaluated as `curve` says."""
    os.makedirs(os.path.join(run_dir, "final"))
    Path(run_dir, "final", "args.json").write_text(json.dumps(vars(vineppo.parse_args(argv))))
    Path(run_dir, "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(curve)))


def test_report_leaves_out_runs_made_with_other_settings(tmp_path, monkeypatch, capsys):
    """--report checks each finished run's settings as training does: a run made with others is left out and
    named with the reason, and results.json holds only runs made with the settings it records."""
    monkeypatch.setattr(cc, "MATCHED_SHARE_OF", ("2", 0.3))
    flags = ["--chain-lengths", "2", "--sft-epochs=-1", "--seeds", "0,1", "--critics", "mc,grpo",
             "--iterations", "2", "--eval-every", "1", "--output-dir", str(tmp_path)]
    args = cc.parse_length_args(flags)
    settings = cc.length_settings(args)
    finish_by_hand(cc.sft_argv(0, settings, args), cc.sft_dir(args, 0), {0: 0.3})
    for seed in ("0", "1"):
        for critic in ("mc", "grpo"):
            other = ["--iterations", "3"] if (critic, seed) == ("grpo", "1") else []  # not the experiment's 2
            finish_by_hand(cc.rl_argv(0, seed, critic, settings, args) + other, cc.rl_dir(args, "2", critic, seed),
                           {0: 0.3, 1: 0.4, 2: 0.5})
    left = cc.rl_dir(args, "2", "grpo", "1")

    out = cc.main(["--lengths", "--report"] + flags)
    printed = capsys.readouterr().out
    assert f"{left}: left out, made with other settings (iterations)" in printed
    assert sorted(r["run"] for r in out["runs"]) == sorted(cc.rl_dir(args, "2", c, s) for c, s in
                                                           [("mc", "0"), ("mc", "1"), ("grpo", "0")])
    assert [r["seeds"] for r in out["rows"]] == [["0", "1"], ["0"]]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["args"]["iterations"] == 2 and len(saved["runs"]) == 3 and saved["left_out"] == {left: ["iterations"]}

    out = cc.main(["--lengths", "--report"] + flags + ["--sft-epochs=0.5"])  # the SFT model had the demo's
    assert f"{cc.sft_dir(args, 0)}: left out, made with other settings (sft_epochs)" in capsys.readouterr().out
    assert out["sft_pass@1"] == {} and len(out["runs"]) == 3

    report = (tmp_path / "results.json").read_bytes()
    with pytest.raises(SystemExit) as stop:  # none was made with 20
        cc.main(["--lengths", "--report"] + flags + ["--iterations", "20"])
    assert "no finished run made with these settings" in str(stop.value) and "\n" not in str(stop.value)
    assert capsys.readouterr().out.count("left out, made with other settings (iterations)") == 4
    assert (tmp_path / "results.json").read_bytes() == report  # nothing written


# ============================================================================================
# 4. A tiny experiment end to end, then again (nothing trained), then one run resumed
# ============================================================================================
SMALL = dict(iterations=1, prompts_per_iteration=2, samples_per_prompt=2, minibatch_size=4, micro_batch_size=4,
             lr=5e-5, mc_rollouts=2, max_new_tokens=8, sft_lr=3e-3, sft_epochs=0.02, sft_batch_size=16,
             eval_every=1, eval_problems=4, eval_samples=1, value_lr=2e-3, critic_warmup=1)


def test_experiment_end_to_end_skips_finished_runs_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vineppo, "TINY_DEMO_OVERRIDES", SMALL)
    monkeypatch.setattr(cc, "MATCHED_SHARE_OF", ("2", 0.3))
    flags = ["--lengths", "--chain-lengths", "2,3", "--sft-epochs=-1,0.02", "--seeds", "1",
             "--critics", "mc,value,grpo", "--iterations", "2", "--eval-every", "1", "--eval-problems", "4",
             "--output-dir", str(tmp_path)]
    first = cc.main(flags)
    assert len(first["runs"]) == 2 * 3 and len(first["rows"]) == 2 * 3
    assert set(first["sft_pass@1"]) == {"2", "3"}
    assert first["settings"][0]["slip_rate"] == 0.3 and first["settings"][1]["max_new_tokens"] == 36  # 12 x 3
    for r in first["runs"]:
        assert len(vineppo.read_metrics(r["run"])) == 3  # iterations 0, 1, 2
    assert os.path.isfile(tmp_path / "lengths.png") and os.path.isfile(tmp_path / "results.json")
    capsys.readouterr()

    again = cc.main(flags)  # everything finished: nothing is trained, the same table
    assert capsys.readouterr().out.count("finished, skipped") == 2 + 6
    assert json.loads(json.dumps(again["rows"])) == json.loads(json.dumps(first["rows"]))

    stopped = tmp_path / "3" / "value-seed1"  # a run stopped after its checkpoint: it resumes
    (stopped / "final" / "args.json").unlink()
    cc.main(flags)
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 7 and f"{stopped}: resuming" in out

    with pytest.raises(SystemExit) as stop:  # the settings are fixed: other ones need another directory
        cc.main([f if f != "--iterations" else "--iterations=3" for f in flags if f != "2"])
    assert "other settings" in str(stop.value)


def test_sweep_end_to_end_shares_the_demo_runs_and_reports_the_claims(tmp_path, monkeypatch, capsys):
    """--sweep over a flag: one SFT model per seed, the value equal to the demo's runs in demo/ (a second sweep
    that includes it trains nothing there), train pass@1 logged at every evaluation, the claims table printed."""
    monkeypatch.setattr(vineppo, "TINY_DEMO_OVERRIDES", SMALL)
    flags = ["--seeds", "0", "--critics", "mc,value", "--iterations", "2", "--eval-every", "1", "--eval-problems", "4",
             "--eval-train-problems", "4", "--output-dir", str(tmp_path)]
    first = cc.main(["--sweep", "temperature=0.6,1.0"] + flags)
    assert sorted(r["run"] for r in first["runs"]) == sorted(
        str(tmp_path / s / f"{c}-seed0") for s in ("demo", "temperature=1.0") for c in ("mc", "value"))
    assert [r["setting"] for r in first["rows"]] == ["demo", "demo", "temperature=1.0", "temperature=1.0"]
    for r in first["runs"]:
        assert all("eval/train_pass@1" in rec for rec in vineppo.read_metrics(r["run"]))
    hot = vineppo.parse_args(["--model", "tiny"] + cc.sweep_plan(cc.parse_experiment_args(
        ["--sweep", "temperature=0.6,1.0"] + flags, False))[1][2]["argv"][4:])
    assert hot.temperature == 1.0 and hot.eval_train_problems == 4
    assert os.path.isfile(tmp_path / "results-temperature.json") and os.path.isfile(tmp_path / "curves-temperature.png")
    printed = capsys.readouterr().out
    assert "to PPO peak" in printed and "test/train slope" in printed

    second = cc.main(["--sweep", "mc-rollouts=1,2", "--critics", "mc"] + flags[4:])  # 2 = SMALL's: the demo's
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 2 and "mc-rollouts=1/mc-seed0: starting" in printed
    assert [r["setting"] for r in second["rows"]] == ["mc-rollouts=1", "demo"]
