"""compare_critics.py --gradients: the cosine, the batches, the batch size a method needs, the minibatch
gradient against a hand computation, MC credit as training forms it, a reference independent of the pool,
and one tiny end-to-end run on a saved random model."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compare_critics as cc  # noqa: E402
import vineppo  # noqa: E402


# ============================================================================================
# 1. Pure functions
# ============================================================================================
def test_cosine_hand_computed_and_zero_for_an_empty_update():
    assert cc.cosine(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])) == pytest.approx(24 / 25)
    assert cc.cosine(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(-1.0)
    assert cc.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == 0.0
    assert cc.cosine(torch.tensor([7.0, 1.0]), torch.tensor([14.0, 2.0])) == pytest.approx(1.0)  # scale-free
    assert cc.cosine(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])) == 0.0  # moves nothing: no direction


def test_draw_batches_keeps_whole_groups_and_never_repeats_a_response():
    groups = [list(range(g * 4, (g + 1) * 4)) for g in range(6)]
    batches = cc.draw_batches(groups, 12, n_batches=50, seed=1)
    assert len(batches) == 50
    for rows in batches:
        assert len(rows) == len(set(rows)) == 12  # no response twice in a batch
        chunks = [rows[i:i + 4] for i in range(0, 12, 4)]
        assert all(chunk in groups for chunk in chunks)  # whole groups, as drawn
    assert len({tuple(sorted(rows)) for rows in batches}) > 5  # batches differ from each other
    assert batches == cc.draw_batches(groups, 12, n_batches=50, seed=1)  # seeded
    assert sorted(cc.draw_batches(groups, 24, n_batches=1, seed=0)[0]) == list(range(24))  # the whole pool, once
    with pytest.raises(ValueError, match="whole number of groups"):
        cc.draw_batches(groups, 10, n_batches=1, seed=0)
    with pytest.raises(ValueError, match="the pool has 6"):
        cc.draw_batches(groups, 28, n_batches=1, seed=0)


def test_batch_size_needed_interpolates_in_log_b():
    sizes = [16, 32, 64, 128]
    assert cc.batch_size_needed(sizes, [0.2, 0.3, 0.5, 0.6], 0.4) == pytest.approx(math.sqrt(32 * 64))  # halfway
    assert cc.batch_size_needed(sizes, [0.2, 0.3, 0.5, 0.6], 0.35) == pytest.approx(32 * 2 ** 0.25)  # a quarter
    assert cc.batch_size_needed(sizes, [0.2, 0.3, 0.5, 0.6], 0.3) == pytest.approx(32)  # the yardstick itself
    assert cc.batch_size_needed(sizes, [0.5, 0.6, 0.7, 0.8], 0.4) == 16  # reached at the smallest B already
    assert math.isinf(cc.batch_size_needed(sizes, [0.1, 0.2, 0.25, 0.3], 0.4))  # never reached
    assert cc.batch_size_needed(sizes, [0.1, 0.5, 0.3, 0.9], 0.3) == pytest.approx(16 * 2 ** 0.5)  # first crossing
    assert [cc.format_needed(v, sizes) for v in (math.inf, 16.0, 45.25)] == [">128", "<=16", "45"]


def test_spread_of_the_batch_cosines_hand_computed():
    out = cc.spread([0.4, 0.1, 0.3, 0.2])
    assert out["mean"] == pytest.approx(0.25) and out["n"] == 4
    assert out["std"] == pytest.approx(math.sqrt((0.15 ** 2 + 0.05 ** 2) * 2 / 3))  # sample std (n - 1)
    assert out["se"] == pytest.approx(out["std"] / 2)
    assert out["range95"] == (0.1, 0.4)  # 4 batches: the middle 95% is all of them


# ============================================================================================
# 2. Gradients and credit, exactly as training forms them
# ============================================================================================
@pytest.fixture(scope="module")
def tok():
    return vineppo.build_tiny_tokenizer()


def test_policy_gradient_is_the_whitened_advantage_weighted_score_per_token(tok):
    """At ratio 1, minibatch_backward's gradient is sum_t whitened(A)_t grad log pi_t / n_tokens over the
    minibatch: here recomputed by hand, each response alone (no padding), whitening by hand over the chosen
    rows only, with a large KL weight (its gradient is 0 where pi = pi_ref) and micro-batches of 2."""
    with torch.random.fork_rng():
        policy = vineppo.build_tiny_model(tok, seed=3).eval()
    args = vineppo.Args(temperature=0.6, micro_batch_size=2, kl_coef=1.0)
    prompts = [vineppo.encode_prompt(tok, p) for p in ("Start at 3: +4.", "Start at 12: *2, -5.", "Start at 9: -1.")]
    responses = [tok.encode(t, add_special_tokens=False) for t in ("\n3+4=7\n#### 7", "\n12*2=24\n24-5=19", "\n9-1=8")]
    responses[0].append(tok.eos_token_id)
    batch = vineppo.collate(prompts, responses, tok.pad_token_id)
    advantages = [[0.1 * ((3 * b + t) % 7) - 0.2 for t in range(len(r))] for b, r in enumerate(responses)]
    fixed = vineppo.precompute(policy, policy, None, batch, args, torch.device("cpu"))
    rows = [2, 0, 1]  # the minibatch, in the order ppo_update's permutation might give
    got = cc.policy_gradient(policy, batch, fixed, vineppo.right_aligned(advantages, batch["response_mask"].shape[1]),
                             rows, args, torch.device("cpu"))

    chosen = [a for b in rows for a in advantages[b]]
    mean = sum(chosen) / len(chosen)
    std = math.sqrt(sum((a - mean) ** 2 for a in chosen) / len(chosen) + 1e-8)
    objective = 0.0
    for b in rows:
        ids = torch.tensor([prompts[b] + responses[b]])
        logits = policy(input_ids=ids).logits[0, len(prompts[b]) - 1:-1] / args.temperature  # predicts each response token
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(responses[b]).unsqueeze(-1)).squeeze(-1)
        objective = objective + sum((a - mean) / std * lp for a, lp in zip(advantages[b], logp))
    objective = objective / len(chosen)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(objective, list(policy.parameters()))])
    assert got.shape == expected.shape and got.norm() > 0
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in policy.parameters())  # zeroed for the next batch
    assert cc.cosine(got, expected) == pytest.approx(1.0, abs=1e-6)


def fake_rollouts(monkeypatch, reward_of_state):
    """vineppo.mc_rollout replaced by rewards that depend on the state and on how often it was rolled out."""
    seen = {}

    def mc_rollout(model, tokenizer, origin, args, counts=None, desc=""):
        def rollout(states):
            out = []
            for s in states:
                assert s in origin  # only states whose answer and prompt length are known
                out.append(reward_of_state(s, seen.get(s, 0)))
                seen[s] = seen.get(s, 0) + 1
            return out
        return rollout
    monkeypatch.setattr(vineppo, "mc_rollout", mc_rollout)
    return seen


def test_mc_token_advantages_are_those_assign_mc_advantages_gives(monkeypatch, tok):
    """The same rollouts through training's assign_mc_advantages and through the analysis's helpers give the
    same token advantages, for K = 3 and, from the first rollout of the same states, K = 1; with a state cap."""
    prompt = vineppo.encode_prompt(tok, "Start at 7: *2, -8, +3.")
    decode = lambda t: vineppo.decode_response(tok, t)  # noqa: E731
    episodes = []
    for text, reward in [("\n7*2=14\n14-8=6\n6+3=9\n#### 9", 1.0), ("\n7*2=9\n9-8=1\n1+3=4\n#### 4", 0.0)]:
        response = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        steps = vineppo.split_steps(decode(response))
        episodes.append(vineppo.Episode(0, prompt, response, text, reward, False, steps=steps,
                                        step_starts=vineppo.step_token_starts(decode, response, steps)))
    problems = [{"answer": "9"}]
    args = vineppo.Args(task="arith", mc_rollouts=3, max_states_per_response=3)
    reward = lambda s, i: float((len(s) + i) % 3 == 0)  # noqa: E731
    for k in (3, 1):
        fake_rollouts(monkeypatch, reward)
        vineppo.assign_mc_advantages(None, tok, episodes, problems, replace(args, mc_rollouts=k))
        trained = [e.token_advantages for e in episodes]
        fake_rollouts(monkeypatch, reward)
        rewards = cc.mc_rollout_rewards(None, tok, episodes, problems, args, 3, "test")
        assert all(len(r) == 3 for r in rewards.values()) and len(rewards) == 1 + 2 * 2  # s_0 shared, cap 3
        ours = cc.mc_token_advantages(episodes, rewards, k, vineppo.state_cap(args))
        assert [len(a) for a in ours] == [len(a) for a in trained]
        assert sum(ours, []) == pytest.approx(sum(trained, []))
    assert len({a for e in episodes for a in e.token_advantages}) > 1  # the values really vary


def tiny_saved_run(tmp_path, tok, max_new_tokens=9):
    with torch.random.fork_rng():
        policy = vineppo.build_tiny_model(tok, seed=0).eval()
        value_model = vineppo.ValueNetwork.from_policy(policy).eval()
    run_args = vineppo.Args(task="arith", max_new_tokens=max_new_tokens, train_problems=40, test_problems=4,
                            output_dir=str(tmp_path / "run"), micro_batch_size=8)
    vineppo.save_final(policy, tok, value_model, run_args)
    return run_args


@pytest.fixture
def text_rewards(monkeypatch):
    """A random model never writes a right answer or a newline: grade by the parity of the text's characters
    and cut a step every 3 characters, so that values and advantages vary (as in test_compare_critics)."""
    monkeypatch.setattr(vineppo, "reward_of", lambda task, text, ended, answer: float(sum(map(ord, text)) % 2))
    monkeypatch.setattr(vineppo, "split_response", lambda task, text: [text[i:i + 3] for i in range(0, len(text), 3)] or [text])


def test_the_reference_shares_no_problem_response_or_rollout_with_the_pool(monkeypatch, tmp_path, tok, text_rewards):
    run_args = tiny_saved_run(tmp_path, tok)
    policy, tokenizer, _, run_args = cc.load_run(str(tmp_path / "run"), "cpu")
    train, _, _ = vineppo.load_task(run_args)
    calls, sample = [], vineppo.sample_continuations

    def recorded(model, prefixes, budgets, **kwargs):
        calls.append([tuple(p) for p in prefixes])
        return sample(model, prefixes, budgets, **kwargs)
    monkeypatch.setattr(vineppo, "sample_continuations", recorded)
    args = cc.GradientArgs(reference_problems=4, reference_samples=2, reference_k=5, pool_problems=3,
                           samples_per_problem=4, mc_k="1,3")
    (reference, ref_rewards), (pool, pool_rewards) = cc.sample_reference_and_pool(policy, tokenizer, train, run_args, args)
    ref_problems, pool_problems = {e.problem_index for e in reference}, {e.problem_index for e in pool}
    assert len(ref_problems) == 4 and len(pool_problems) == 3 and not ref_problems & pool_problems
    assert (len(reference), len(pool)) == (8, 12)
    assert not set(ref_rewards) & set(pool_rewards)  # no state, so no rollout, is shared
    assert all(len(r) == 5 for r in ref_rewards.values()) and all(len(r) == 3 for r in pool_rewards.values())
    prompts = {"reference": {tuple(e.prompt_ids) for e in reference}, "pool": {tuple(e.prompt_ids) for e in pool}}
    assert len(calls) == 4  # responses and rollouts, the reference's then the pool's: four separate calls
    for call, owner in zip(calls, ["reference", "reference", "pool", "pool"]):
        assert all(any(p[:len(q)] == q for q in prompts[owner]) for p in call)  # each call serves one side only
    assert {s for s in calls[1]} == set(ref_rewards) and {s for s in calls[3]} == set(pool_rewards)


# ============================================================================================
# 3. Command line and a tiny end-to-end run
# ============================================================================================
@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "16,20"], "multiples of --samples-per-problem"),
    (["--batch-sizes", "16,32,1024"], "larger than the pool"),
    (["--yardstick-batch", "48"], "--yardstick-batch"), (["--chain-lengths", "5-3"], "--chain-lengths"),
    (["--mc-k", "0"], "--mc-k"), (["--reference-problems", "1"], "two halves"),
    (["--runs", "/nonexistent/run"], "final/value"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as error:
        cc.main(["--gradients"] + flags)
    assert str(error.value).startswith("error: ") and message in str(error.value) and "\n" not in str(error.value)


def test_training_runs_are_the_demo_value_run_with_a_warm_critic_then_a_continued_sft():
    args = cc.GradientArgs(chain_lengths="3-5,10-12", sft_epochs="-1,2.5")
    short = vineppo.parse_args(cc.training_argv(0, args) + ["--output-dir", "unused"])
    long = vineppo.parse_args(cc.training_argv(1, args, "runs/short") + ["--output-dir", "unused"])
    for run, length in ((short, "3-5"), (long, "10-12")):
        assert (run.critic, run.iterations, run.chain_length, run.task) == ("value", 0, length, "arith")
        ours = ("max_new_tokens", "sft_epochs", "iterations", "eval_problems")  # the rest (the critic's too): the demo's
        assert {name: getattr(run, name) for name in vineppo.TINY_DEMO_OVERRIDES if name not in ours} \
            == {name: value for name, value in vineppo.TINY_DEMO_OVERRIDES.items() if name not in ours}
    assert short.model == "tiny" and long.model == "runs/short/final"  # the long chain's SFT continues the short one's
    assert (short.sft_epochs, long.sft_epochs) == (vineppo.TINY_DEMO_OVERRIDES["sft_epochs"], 2.5)
    assert short.max_new_tokens == vineppo.TINY_DEMO_OVERRIDES["max_new_tokens"] and long.max_new_tokens >= 12 * 12
    assert short.slip_rate == vineppo.Args.slip_rate  # as many slips per solution on average: 4 x 0.3 = 11 x 0.109
    assert long.slip_rate * 11 == pytest.approx(short.slip_rate * 4, rel=0.01)
    with pytest.raises(SystemExit, match="one number per chain length"):
        cc.main(["--gradients", "--sft-epochs", "-1"])
    forms = cc.GradientArgs(chain_lengths="3-5,10-12", sft_epochs="-1,2.5", step_forms=4)
    assert [vineppo.parse_args(argv + ["--output-dir", "unused"]).step_forms for argv in
            (cc.training_argv(0, forms), cc.training_argv(1, forms, "runs/short"))] == [4, 4]


def test_tiny_end_to_end_run(tmp_path, tok, text_rewards):
    tiny_saved_run(tmp_path, tok)
    out = tmp_path / "gradients"
    flags = ["--gradients", "--runs", str(tmp_path / "run"), "--output-dir", str(out), "--reference-problems", "4",
             "--reference-samples", "2", "--reference-k", "4", "--pool-problems", "4", "--samples-per-problem", "2",
             "--mc-k", "1,3", "--batch-sizes", "2,4", "--yardstick-batch", "2", "--batch-responses", "32", "--device", "cpu"]
    results = cc.main(flags)
    saved = json.loads((out / "results.json").read_text())
    (result,) = saved["results"]
    methods = ["MC K=1", "MC K=3", "value network", "R - V(MC K=3)", "GRPO", "RLOO"]
    assert list(result["summary"]) == list(result["cosines"]) == methods
    for name in methods:
        assert [len(result["cosines"][name][b]) for b in ("2", "4")] == [16, 8]  # batch_responses / B, at least 8
        assert all(-1 <= c <= 1 for b in ("2", "4") for c in result["cosines"][name][b])
    target = result["target"]
    assert (target["method"], target["batch_size"]) == ("MC K=3", 2)  # the largest K at the yardstick B
    assert target["cosine"] == pytest.approx(result["summary"]["MC K=3"]["2"]["mean"])
    assert result["batch_size_needed"]["MC K=3"] == pytest.approx(2) or result["summary"]["MC K=3"]["2"]["mean"] < 0
    assert results["results"][0]["pool"] == result["pool"]
    assert all(result["paired_difference"]["MC K=3"][b]["mean"] == 0 for b in ("2", "4"))
    differences = [a - b for a, b in zip(result["cosines"]["GRPO"]["4"], result["cosines"]["MC K=3"]["4"])]
    assert result["paired_difference"]["GRPO"]["4"]["mean"] == pytest.approx(sum(differences) / len(differences))
    assert set(result["whole_pool"]) == set(methods)
    assert all(-1 <= c <= 1 for c in result["whole_pool"].values())
    assert -1 <= result["reference"]["halves_cosine"] <= 1 and result["pool"]["responses"] == 8
    assert (out / "gradients.png").stat().st_size > 1000
    assert list(result["same_batch"]) == methods and all(  # a batch is left out where the true-credit gradient is 0
        len(result["same_batch_cosines"][n].get(b, [])) + result["same_batch_skipped"][b] == len(result["cosines"][n][b])
        for n in methods for b in ("2", "4"))
    assert result["entropy"]["other"]["tokens"] > 0 and result["step_forms"] == 1  # a random model writes few results
    with pytest.raises(SystemExit, match="already holds results"):
        cc.main(flags)


def test_result_characters_in_every_step_form():
    text = "\n13-5=8\n8 * 2 = 16\n20=16+4\n20 minus 3 is 17\n17+1=1x\n#### 17"
    assert [text[i] for i in sorted(cc.result_characters(text))] == list("8" "16" "20" "17")
    steps = vineppo.solve_chain(13, [("-", 5), ("*", 2), ("+", 4), ("-", 3)], form=iter([0, 1, 2, 3]).__next__)[0]
    assert [steps[i] for i in sorted(cc.result_characters(steps))] == list("8" "16" "20" "17")  # the task's own forms
    assert cc.result_characters("-1=5-6") == {0, 1} and cc.result_characters("no steps here") == set()


def test_entropy_by_role_splits_the_tokens_and_averages_each_part(tok):
    """A model whose logits are all equal has entropy log(vocab) at every token at any temperature; a model
    sure of one token has 0. The result's tokens are counted apart from the others."""
    problem = {"problem": "Start at 13: -5, *2.", "answer": "16"}
    episodes = [vineppo.episode_from_text(tok, problem, text, task="arith")
                for text in ("\n13-5=8\n8*2=16\n#### 16", "\n8=13-5\n16=8*2\n#### 16")]

    class Flat(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale, self.anchor = scale, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, position_ids):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., 5] = self.scale  # scale 0: every token alike; large: token 5 is sure
            return type("Out", (), {"logits": logits})()

    uniform = cc.entropy_by_role(Flat(0.0), tok, episodes, temperature=0.6)
    assert (uniform["result"]["tokens"], uniform["other"]["tokens"]) == (6, 2 * 23 - 6)  # 8 and 16 twice; the rest, EOS too
    assert uniform["result"]["mean"] == pytest.approx(math.log(len(tok)), rel=1e-5)
    assert uniform["other"]["mean"] == pytest.approx(math.log(len(tok)), rel=1e-5)
    sure = cc.entropy_by_role(Flat(100.0), tok, episodes, temperature=1.0)
    assert sure["result"]["mean"] == pytest.approx(0.0, abs=1e-6) and sure["other"]["mean"] == pytest.approx(0.0, abs=1e-6)

@pytest.mark.parametrize("true_credit_differs", [False, True])
def test_same_batch_true_credit_is_fresh_rollouts_of_the_pool_states(monkeypatch, tmp_path, tok, text_rewards,
                                                                     true_credit_differs):
    """If a state's rollouts all score the same (a reward fixed by the state), MC credit with any K is the
    true credit, so its batch gradients are the true-credit ones: same-batch cosine exactly 1; the response-
    level methods are not. If the true credit's own rollouts score otherwise, MC's cosines drop below 1: the
    truth is built from them. They are a call of their own, K = --reference-k, on the pool's states (none of
    the reference's)."""
    tiny_saved_run(tmp_path, tok)
    torch.manual_seed(0)  # the same responses whatever ran before
    calls, real = [], cc.mc_rollout_rewards

    def by_state(policy, tokenizer, episodes, problems, run_args, k, desc):
        rewards = real(policy, tokenizer, episodes, problems, run_args, 1, desc)  # the states, as training's
        calls.append((desc, k, set(rewards)))
        divisor = 2 if true_credit_differs and "true credit" in desc else 3
        return {s: [float(sum(s) % divisor == 0)] * k for s in rewards}
    monkeypatch.setattr(cc, "mc_rollout_rewards", by_state)
    args = cc.GradientArgs(reference_problems=4, reference_samples=2, reference_k=4, pool_problems=4,
                           samples_per_problem=2, mc_k="1,3", batch_sizes="2,4", yardstick_batch=2, batch_responses=16,
                           output_dir=str(tmp_path / "out"))
    result = cc.analyse_policy(str(tmp_path / "run"), args, "cpu")
    (_, _, ref_states), (_, _, pool_states), (desc, k, true_states) = calls
    assert "true credit" in desc and k == 4 and true_states == pool_states and not true_states & ref_states
    mc = [c for name in ("MC K=1", "MC K=3") for b in (2, 4) for c in result["same_batch_cosines"][name][b]]
    assert len(mc) == 2 * (8 + 8) - 2 * sum(result["same_batch_skipped"].values()) > 0
    if true_credit_differs:
        assert min(mc) < 0.99
    else:
        assert all(c == pytest.approx(1.0) for c in mc)
        for name in ("GRPO", "RLOO", "value network", "R - V(MC K=3)"):  # other forms of credit
            assert min(c for b in (2, 4) for c in result["same_batch_cosines"][name][b]) < 0.999


def test_return_minus_value_is_the_critic_form_with_mc_values():
    """Hand-made: V(s_0..s_2) = 2/3, 1/3, 0 from three rollouts each, R = 1. VinePPO's step advantages are
    V(s_1) - V(s_0), V(s_2) - V(s_1), R - V(s_2); the critic's form is R - V(s_i) on every token of step i;
    with a cap of 2 states the third step gets V = R, so 0 in both forms' last step past the cap."""
    e = vineppo.Episode(0, [5, 6], [10, 11, 12, 13, 14], "", 1.0, False, steps=["a", "b", "c"], step_starts=[0, 2, 4])
    s0, s1, s2 = vineppo.episode_states(e)
    rewards = {s0: [1.0, 0.0, 1.0], s1: [0.0, 0.0, 1.0], s2: [0.0, 0.0, 0.0]}
    t = 1 / 3
    assert cc.mc_token_advantages([e], rewards, 3, None)[0] == pytest.approx([-t, -t, -t, -t, 1.0])
    assert cc.mc_token_advantages([e], rewards, 3, None, return_minus_value=True)[0] == pytest.approx([t, t, 2 * t, 2 * t, 1.0])
    assert cc.mc_token_advantages([e], rewards, 3, 2, return_minus_value=True)[0] == pytest.approx([t, t, 2 * t, 2 * t, 0.0])
    assert cc.mc_token_advantages([e], rewards, 3, 2)[0] == pytest.approx([-t, -t, 2 * t, 2 * t, 0.0])
    assert cc.mc_token_advantages([e], rewards, 1, None, return_minus_value=True)[0] == pytest.approx([0.0, 0.0, 1.0, 1.0, 1.0])
