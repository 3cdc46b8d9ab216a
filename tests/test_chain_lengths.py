"""compare_critics.py --sweep and --lengths: the run plans, the task settings per chain length, the halfway
point, the time to PPO's peak, pass@1 at matched KL, the train/test slope and the tables' aggregation on
hand-made inputs, the skip/resume decision, and tiny experiments run twice (the rerun trains nothing) on
shrunken demo settings."""

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
    args = cc.parse_experiment_args([], lengths=True)
    assert (args.iterations, args.eval_problems, args.eval_train_problems) == (10, 128, 0)  # --lengths' defaults
    settings = cc.length_settings(args)
    assert [s["chain_length"] for s in settings] == ["4-6", "8-10", "12-16"]
    assert [s["max_new_tokens"] for s in settings] == [80, 120, 192]  # 12 tokens an operation, at least 80
    assert [s["slip_rate"] for s in settings] == [0.3, 0.178, 0.122]  # the README's table was run with these
    sfts, planned = cc.length_plan(args)
    first = vineppo.parse_args(sfts[0]["argv"])
    assert (first.model, first.sft_epochs, first.iterations, first.chain_length) == ("tiny", 10.4, 0, "4-6")
    later = vineppo.parse_args(sfts[2]["argv"][2:])  # its model (the previous length's SFT) does not exist here
    assert sfts[2]["argv"][:2] == ["--model", os.path.join(args.output_dir, "sft-8-10", "final")]
    assert (later.sft_epochs, later.chain_length, later.max_new_tokens, later.slip_rate) == (4, "12-16", 192, 0.122)
    assert (later.sft_lr, later.eval_problems) == (3e-3, 256)  # the demo's, typed since the model is not `tiny`
    assert [(r["setting"], r["critic"], r["seed"]) for r in planned[:4]] == [
        ("4-6", "mc", "0"), ("4-6", "value", "0"), ("4-6", "grpo", "0"), ("8-10", "mc", "0")]  # seed by seed
    mine = [r for r in planned if (r["setting"], r["seed"]) == ("12-16", "1")]
    runs = [vineppo.parse_args(r["argv"][2:]) for r in mine]
    for r, run, critic in zip(mine, runs, ("mc", "value", "grpo")):
        assert (run.critic, run.seed, run.sft_epochs, run.iterations, run.eval_problems) == (critic, 1, 0, 10, 128)
        assert r["argv"][:2] == ["--model", os.path.join(args.output_dir, "sft-12-16", "final")]
        assert run.output_dir == r["dir"] == os.path.join(args.output_dir, "12-16", f"{critic}-seed1")
        assert (run.chain_length, run.max_new_tokens, run.eval_train_problems) == ("12-16", 192, 0)
    same = [{k: v for k, v in vars(r).items() if k not in ("critic", "output_dir")} for r in runs]
    assert same[0] == same[1] == same[2]  # only the critic differs between methods
    assert (runs[0].lr, runs[0].mc_rollouts, runs[0].value_lr, runs[0].critic_warmup) == (5e-5, 4, 2e-3, 8)


def test_sweep_plan_one_sft_per_seed_demo_setting_shared_task_flags_reach_the_sft():
    args = cc.parse_experiment_args(["--sweep", "mc-rollouts=1,4,9", "--seeds", "3,5", "--critics", "mc"], lengths=False)
    assert (args.iterations, args.eval_every, args.eval_problems, args.eval_train_problems) == (14, 2, 256, 256)
    sfts, planned = cc.sweep_plan(args)
    assert [s["dir"] for s in sfts] == [os.path.join("runs/claims", f"sft-seed{s}") for s in (3, 5)]
    sft = vineppo.parse_args(sfts[1]["argv"])  # the demo's SFT: `vineppo.py --seed 5 --iterations 0`
    assert (sft.model, sft.seed, sft.iterations, sft.sft_epochs, sft.mc_rollouts) == ("tiny", 5, 0, 10.4, 4)
    assert [r["dir"] for r in planned] == [os.path.join("runs/claims", s, f"mc-seed{seed}") for seed in (3, 5)
                                           for s in ("mc-rollouts=1", "demo", "mc-rollouts=9")]  # 4 is the demo's
    runs = [vineppo.parse_args(r["argv"][2:]) for r in planned]
    assert [r.mc_rollouts for r in runs] == [1, 4, 9] * 2 and {r.seed for r in runs[3:]} == {5}
    assert all(r["argv"][:2] == ["--model", os.path.join("runs/claims", f"sft-seed{r['seed']}", "final")]
               for r in planned)
    assert (runs[0].iterations, runs[0].eval_every, runs[0].save_every, runs[0].eval_train_problems) == (14, 2, 2, 256)
    assert (runs[0].lr, runs[0].temperature, runs[0].value_lr, runs[0].critic_warmup) == (5e-5, 0.6, 2e-3, 8)

    args = cc.parse_experiment_args(["--sweep", "slip-rate=0.3,0.1", "--seeds", "0", "--critics", "mc,grpo"], False)
    sfts, planned = cc.sweep_plan(args)  # a task flag: the SFT model learns the task with the setting's value
    assert [s["dir"] for s in sfts] == ["runs/claims/sft-seed0", "runs/claims/slip-rate=0.1/sft-seed0"]
    assert vineppo.parse_args(sfts[1]["argv"]).slip_rate == 0.1
    assert [vineppo.parse_args(r["argv"][2:]).slip_rate for r in planned] == [0.3, 0.3, 0.1, 0.1]
    assert planned[2]["argv"][1] == "runs/claims/slip-rate=0.1/sft-seed0/final"
    args = cc.parse_experiment_args(["--sweep", "sft-lr=0.003,0.001", "--seeds", "0", "--critics", "mc"], False)
    sfts, planned = cc.sweep_plan(args)  # an SFT flag: the SFT model alone
    assert vineppo.parse_args(sfts[1]["argv"]).sft_lr == 0.001 and planned[1]["argv"][1].startswith("runs/claims/sft-lr=")
    assert vineppo.parse_args(planned[1]["argv"][2:]).sft_epochs == 0


@pytest.mark.parametrize("lengths, flags, message", [
    (True, ["--chain-lengths", "4-6,x"], "--chain-lengths"), (True, ["--sft-epochs=-1,4"], "--sft-epochs"),
    (True, ["--sft-epochs=-1,-1,4"], "--sft-epochs"), (True, ["--critics", "mc,ppo"], "--critics"),
    (True, ["--seeds", "0,a"], "--seeds"), (True, ["--iterations", "0"], "--iterations"),
    (True, ["--sweep", "lr=1,2"], "not --sweep"), (False, [], "--sweep is required"),
    (False, ["--sweep", "temperature"], "FLAG=V1,V2"), (False, ["--sweep", "no-such-flag=1,2"], "FLAG=V1,V2"),
    (False, ["--sweep", "gradient-checkpointing=0,1"], "takes a value"), (False, ["--sweep", "critic=mc,grpo"], "sets it"),
    (False, ["--sweep", "mc-rollouts=1,x"], "int values"), (False, ["--sweep", "lr=1e-4,0.0001"], "repeated"),
    (False, ["--sweep", "lr=1e-4", "--chain-lengths", "4-6"], "belongs to --lengths"),
    (False, ["--sweep", "lr=1e-4", "--eval-train-problems=-1"], "cannot be negative")])
def test_bad_flags_are_one_line_errors(lengths, flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cc.parse_experiment_args(flags, lengths)
    assert message in str(stop.value) and "\n" not in str(stop.value)


def test_a_bad_value_for_a_run_stops_the_sweep_before_anything_is_trained(tmp_path):
    with pytest.raises(SystemExit) as stop:
        cc.main(["--sweep", "temperature=0.6,-1", "--output-dir", str(tmp_path / "out")])
    assert "--temperature must be positive" in str(stop.value) and not (tmp_path / "out").exists()


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


def run(setting, critic, seed, before, after, ev=None, curve=None):
    return {"setting": setting, "critic": critic, "seed": seed, "before": before, "after": after,
            "credit_ev": ev, "tokens": 1000.0, "records": records(curve or {0: before, 2: after})}


def test_aggregate_means_paired_leads_and_halfway_by_hand():
    runs = [run("4-6", "mc", "0", 0.5, 0.8, ev=0.6), run("4-6", "grpo", "0", 0.5, 0.7),
            run("4-6", "mc", "1", 0.4, 0.6, ev=0.4, curve={0: 0.4, 1: 0.45, 2: 0.6}), run("4-6", "grpo", "1", 0.4, 0.7),
            run("8-10", "mc", "0", 0.3, 0.5, ev=0.5), run("8-10", "grpo", "0", 0.3, 0.35)]
    rows = {(r["setting"], r["critic"]): r for r in cc.aggregate(runs, ["mc", "grpo"])}
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


def test_aggregate_gain_minus_the_demo_settings_pairs_by_seed_and_critic():
    runs = [run("demo", "mc", "0", 0.5, 0.8), run("demo", "mc", "1", 0.4, 0.5), run("demo", "value", "0", 0.5, 0.7),
            run("t=1", "mc", "0", 0.5, 0.6), run("t=1", "mc", "1", 0.4, 0.6), run("t=1", "value", "1", 0.4, 0.4)]
    rows = {(r["setting"], r["critic"]): r for r in cc.aggregate(runs, ["mc", "value"])}
    assert rows[("demo", "mc")]["gain_minus_demo"] is None
    assert rows[("t=1", "mc")]["gain_minus_demo"] == pytest.approx((-0.05, math.sqrt(2 * 0.15 ** 2)))  # -0.2, +0.1
    assert rows[("t=1", "value")]["gain_minus_demo"] is None  # its demo run is seed 0's, it is seed 1


def test_aggregate_skips_a_critic_with_no_finished_run():
    rows = cc.aggregate([run("4-6", "grpo", "0", 0.5, 0.7)], ["mc", "grpo"])
    assert [r["critic"] for r in rows] == ["grpo"] and rows[0]["lead"] is None  # no mc run to pair with


def with_keys(records_, key, values):
    """Add {iteration: value} under `key` to hand-made records."""
    for r in records_:
        if r["iteration"] in values:
            r[key] = values[r["iteration"]]
    return records_


def test_time_to_reach_and_peak():
    curve = records({0: 0.5, 2: 0.6, 4: 0.8, 6: 0.7}, warmup_s=5.0)
    assert cc.peak(curve) == 0.8 and cc.peak(records({0: 0.9, 2: 0.6})) == 0.6  # after the start only
    assert cc.time_to_reach(curve, 0.8) == {"iteration": 4, "seconds": 45.0, "tokens": 400}
    assert cc.time_to_reach(curve, 0.6)["iteration"] == 2 and cc.time_to_reach(curve, 0.81) is None
    assert cc.time_to_reach(records({0: 0.9, 2: 0.6}), 0.8) is None  # the start does not count


def test_pass_at_kl_is_the_best_pass_at_1_within_the_budget():
    curve = with_keys(records({0: 0.5, 2: 0.7, 4: 0.6, 6: 0.9}), "losses/kl", {1: 0.3, 2: 0.1, 3: 0.0, 4: 0.1, 5: 0.2, 6: 0.4})
    kl, test = zip(*cc.kl_curve(curve))  # the KL: the mean since the last evaluation
    assert kl == pytest.approx((0.0, 0.2, 0.05, 0.3)) and test == (0.5, 0.7, 0.6, 0.9)
    assert cc.pass_at_kl(curve, 0.0) == 0.5 and cc.pass_at_kl(curve, 0.06) == 0.6
    assert cc.pass_at_kl(curve, 0.2) == 0.7 and cc.pass_at_kl(curve, 1.0) == 0.9


def test_train_test_slope_is_least_squares():
    curve = with_keys(records({0: 0.5, 2: 0.6, 4: 0.8}), "eval/train_pass@1", {0: 0.4, 2: 0.6, 4: 0.8})
    assert cc.train_test_slope(curve) == pytest.approx(0.75)  # test = 0.2 + 0.75 train, least squares by hand
    assert cc.train_test_slope(records({0: 0.5, 2: 0.6})) is None  # no train evaluation
    flat = with_keys(records({0: 0.5, 2: 0.6}), "eval/train_pass@1", {0: 0.4, 2: 0.4})
    assert cc.train_test_slope(flat) is None


def test_aggregate_claims_by_hand():
    """Seed 0: PPO peaks at 0.8 at iteration 6 (60 s + its warm-up 20 s); mc reaches 0.8 at iteration 2, grpo never.
    Seed 1: PPO peaks at 0.7 at iteration 2; mc reaches it at 4. The KL budget of a seed is the smallest of its
    methods' largest KLs."""
    def claim_run(critic, seed, curve, kl, train, warmup_s=None):
        r = run("demo", critic, seed, curve[0], curve[max(curve)], curve=curve)
        r["records"] = with_keys(with_keys(records(curve, warmup_s=warmup_s), "losses/kl", kl), "eval/train_pass@1", train)
        return r
    runs = [claim_run("mc", "0", {0: 0.5, 2: 0.8, 4: 0.85, 6: 0.9}, {2: 0.1, 4: 0.2, 6: 0.4}, {0: 0.5, 2: 0.7, 4: 0.8, 6: 0.9}),
            claim_run("value", "0", {0: 0.5, 2: 0.6, 4: 0.7, 6: 0.8}, {2: 0.05, 4: 0.1, 6: 0.3}, {0: 0.5, 2: 0.6, 4: 0.7, 6: 0.8},
                      warmup_s=20.0),
            claim_run("grpo", "0", {0: 0.5, 2: 0.6, 4: 0.65, 6: 0.7}, {2: 0.1, 4: 0.2, 6: 0.5}, {0: 0.5, 2: 0.6}),
            claim_run("mc", "1", {0: 0.4, 2: 0.6, 4: 0.7, 6: 0.7}, {2: 0.1, 4: 0.2, 6: 0.3}, {0: 0.5, 2: 0.6, 4: 0.7, 6: 0.7}),
            claim_run("value", "1", {0: 0.4, 2: 0.7, 4: 0.6, 6: 0.6}, {2: 0.2, 4: 0.4, 6: 0.6}, {0: 0.5, 2: 0.6, 4: 0.7, 6: 0.8})]
    rows = {r["critic"]: r for r in cc.aggregate(runs, ["mc", "value", "grpo"])}
    mc, value, grpo = rows["mc"], rows["value"], rows["grpo"]
    assert mc["to_ppo_peak"]["iteration"] == pytest.approx((3.0, math.sqrt(2.0))) and mc["to_ppo_peak_reached"] == (2, 2)
    assert mc["to_ppo_peak"]["seconds"][0] == pytest.approx(30.0)  # 20 and 40 s; mc has no warm-up
    assert value["to_ppo_peak"]["iteration"] == pytest.approx((4.0, math.sqrt(8.0)))  # its own peak: 6 and 2
    assert value["to_ppo_peak"]["seconds"][0] == pytest.approx((80.0 + 20.0) / 2)  # seed 0's warm-up counts
    assert mc["ppo_over_it"] == pytest.approx({"iteration": 8 / 6, "seconds": 100 / 60})
    assert value["ppo_over_it"] == pytest.approx({"iteration": 1.0, "seconds": 1.0})
    assert grpo["to_ppo_peak"] is None and grpo["to_ppo_peak_reached"] == (0, 1) and grpo["ppo_over_it"] is None
    # KL budgets: seed 0 min(0.4, 0.3, 0.5) = 0.3, seed 1 min(0.3, 0.6) = 0.3
    assert mc["kl_budget"] == pytest.approx((0.3, 0.0))
    assert mc["at_matched_kl"] == pytest.approx((0.775, math.sqrt(2 * 0.075 ** 2)))  # 0.85 (kl 0.2), 0.7 (0.3)
    assert value["at_matched_kl"] == pytest.approx((0.75, math.sqrt(2 * 0.05 ** 2)))  # 0.8 (0.3), 0.7 (0.2)
    assert value["at_matched_kl_minus"] == pytest.approx((0.025, math.sqrt(2 * 0.025 ** 2)))  # +0.05, 0.0
    assert grpo["at_matched_kl"] == pytest.approx((0.65, 0.0)) and mc["at_matched_kl_minus"] is None
    assert mc["slope"][0] == pytest.approx((cc.train_test_slope(runs[0]["records"]) + cc.train_test_slope(runs[3]["records"])) / 2)
    assert value["slope_minus"][0] == pytest.approx(
        (cc.train_test_slope(runs[0]["records"]) - cc.train_test_slope(runs[1]["records"])
         + cc.train_test_slope(runs[3]["records"]) - cc.train_test_slope(runs[4]["records"])) / 2)
    assert grpo["slope"] == pytest.approx((1.0, 0.0))  # two train evaluations: 0.5 -> 0.6 against 0.5 -> 0.6


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
    sfts, planned = cc.length_plan(cc.parse_experiment_args(flags, lengths=True))
    finish_by_hand(sfts[0]["argv"], sfts[0]["dir"], {0: 0.3})
    for r in planned:
        other = ["--iterations", "3"] if (r["critic"], r["seed"]) == ("grpo", "1") else []  # not the experiment's 2
        finish_by_hand(r["argv"] + other, r["dir"], {0: 0.3, 1: 0.4, 2: 0.5})
    left = planned[-1]["dir"]  # grpo, seed 1

    out = cc.main(["--lengths", "--report"] + flags)
    printed = capsys.readouterr().out
    assert f"{left}: left out, made with other settings (iterations)" in printed
    assert sorted(r["run"] for r in out["runs"]) == sorted(r["dir"] for r in planned[:3])
    assert [r["seeds"] for r in out["rows"]] == [["0", "1"], ["0"]]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["args"]["iterations"] == 2 and len(saved["runs"]) == 3 and saved["left_out"] == {left: ["iterations"]}

    out = cc.main(["--lengths", "--report"] + flags + ["--sft-epochs=0.5"])  # the SFT model had the demo's
    assert f"{sfts[0]['dir']}: left out, made with other settings (sft_epochs)" in capsys.readouterr().out
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
    """--sweep over a flag: one SFT model per seed, the value equal to the demo's runs in demo/ (which another
    sweep's report finds), train pass@1 logged at every evaluation, the claims table and figures written."""
    monkeypatch.setattr(vineppo, "TINY_DEMO_OVERRIDES", SMALL)
    flags = ["--seeds", "0", "--iterations", "2", "--eval-every", "1", "--eval-problems", "4",
             "--eval-train-problems", "4", "--output-dir", str(tmp_path)]
    first = cc.main(["--sweep", "temperature=0.6,1.0", "--critics", "grpo,value"] + flags)
    assert sorted(r["run"] for r in first["runs"]) == sorted(
        str(tmp_path / s / f"{c}-seed0") for s in ("demo", "temperature=1.0") for c in ("grpo", "value"))
    assert [r["setting"] for r in first["rows"]] == ["demo", "demo", "temperature=1.0", "temperature=1.0"]
    for r in first["runs"]:
        assert all("eval/train_pass@1" in rec for rec in vineppo.read_metrics(r["run"]))
        assert vineppo.read_metrics(r["run"])[0]["eval/pass@1"] == first["sft_pass@1"]["seed0"]  # one SFT model
    assert json.loads((tmp_path / "temperature=1.0" / "grpo-seed0" / "final" / "args.json").read_text())["temperature"] == 1
    assert all(first["rows"][i]["to_ppo_peak_reached"][1] == 1 for i in range(4))  # each has its seed's PPO run
    for name in ("results-temperature.json", "gains-temperature.png", "curves-temperature.png"):
        assert os.path.isfile(tmp_path / name)
    printed = capsys.readouterr().out
    assert "to PPO peak" in printed and "test/train slope" in printed

    other = cc.main(["--sweep", "kl-coef=0.0001,0.001", "--critics", "grpo", "--report"] + flags)  # 1e-4: the demo's
    assert [r["run"] for r in other["runs"]] == [str(tmp_path / "demo" / "grpo-seed0")]  # trained by the first
    assert not (tmp_path / "kl-coef=0.001").exists()  # --report trains nothing
