"""Seeing the credit: the GRPO / RLOO baselines, token-chunk steps, the credit view (its numbers are the
advantages the update used) and the figures."""

import contextlib
import io
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import conftest  # noqa: E402
import vineppo  # noqa: E402
from test_training import TINY_RUN, parity_grader  # noqa: E402


# --- GRPO and RLOO on hand-made groups
def test_rloo_is_reward_minus_the_mean_of_the_others():
    advantages = vineppo.group_advantages([1.0, 0.0, 0.0, 0.0], [7, 7, 7, 7], "rloo")
    assert advantages == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_grpo_is_the_group_z_score_with_the_sample_std():
    # mean 0.25; sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    advantages = vineppo.group_advantages([1.0, 0.0, 0.0, 0.0], [7, 7, 7, 7], "grpo")
    assert advantages == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_groups_are_separate_and_degenerate_groups_get_zero(method):
    rewards = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5]
    groups = [0, 0, 1, 1, 1, 2, 3]  # a mixed group, an all-equal group, and two groups of one
    advantages = vineppo.group_advantages(rewards, groups, method)
    assert all(math.isfinite(a) for a in advantages)
    assert advantages[2:] == [0.0] * 5  # all equal -> 0 (no 0/0); a group of one -> 0 (no one to compare with)
    assert advantages[0] > 0 > advantages[1] and advantages[0] == pytest.approx(-advantages[1])
    alone = vineppo.group_advantages([1.0, 0.0], [0, 1], method)  # same rewards, but each alone
    assert alone == [0.0, 0.0]
    with pytest.raises(ValueError):
        vineppo.group_advantages([1.0], [0], "ppo")


def test_group_advantages_sum_to_zero_within_each_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    groups = [0, 1, 0, 1, 0, 1, 0, 1]  # interleaved groups
    for method in ("grpo", "rloo"):
        advantages = vineppo.group_advantages(rewards, groups, method)
        for g in (0, 1):
            assert sum(a for a, gg in zip(advantages, groups) if gg == g) == pytest.approx(0.0, abs=1e-9)


def test_chunk_starts():
    assert vineppo.chunk_starts(10, 4) == [0, 4, 8]
    assert vineppo.chunk_starts(8, 4) == [0, 4]  # the EOS after 8 text tokens joins the last step
    assert vineppo.chunk_starts(3, 8) == [0]
    assert vineppo.chunk_starts(0, 8) == [0]  # a response that is only EOS is one step


# --- the credit view on a hand-made response
PROBLEM = {"problem": "Start at 7: *2, -8.", "answer": "6"}
SLIPPED = "\n7*2=9\n9-8=1\n#### 1"  # the multiplication slipped: wrong answer


def hand_credited_episode(values):
    tokenizer = vineppo.build_tiny_tokenizer()
    episode = vineppo.episode_from_text(tokenizer, PROBLEM, SLIPPED, task="arith")
    assert episode.steps == ["\n7*2=9", "\n9-8=1\n#### 1"] and episode.reward == 0.0
    episode.step_values = values
    step_advs = vineppo.step_advantages(values, episode.reward, n_steps=len(episode.step_starts))
    episode.token_advantages = vineppo.token_advantages(step_advs, episode.step_starts, len(episode.response_ids))
    return tokenizer, episode, step_advs


def test_credit_rows_show_the_step_values_and_advantages():
    tokenizer, episode, step_advs = hand_credited_episode([0.75, 0.0])
    rows = vineppo.credit_rows(tokenizer, episode)
    assert [r["text"] for r in rows] == episode.steps
    assert [r["value_before"] for r in rows] == [0.75, 0.0]
    assert [r["value_after"] for r in rows] == [0.0, 0.0]  # after the last step: the reward
    assert step_advs == pytest.approx([-0.75, 0.0])
    assert [r["advantage"] for r in rows] == pytest.approx(step_advs)
    for r in rows:  # with Monte Carlo values the step advantage is exactly after - before
        assert r["advantage"] == pytest.approx(r["value_after"] - r["value_before"])


def test_format_credit_plain_and_coloured():
    tokenizer, episode, _ = hand_credited_episode([0.75, 0.0])
    plain = vineppo.format_credit(tokenizer, episode, problem=PROBLEM)
    lines = plain.splitlines()
    assert "Start at 7" in lines[0] and "gold 6" in lines[0]
    assert "0.75 -> 0.00" in lines[2] and "-0.750" in lines[2] and lines[2].endswith("7*2=9")
    assert lines[3].endswith("9-8=1\\n#### 1")
    assert lines[-1] == "  answer 1 | reward 0"
    assert "\033[" not in plain
    coloured = vineppo.format_credit(tokenizer, episode, color=True)
    assert "\033[31m" in coloured.splitlines()[1]  # the slipped step goes down: red
    assert "\033[" not in coloured.splitlines()[2]  # advantage exactly 0: no colour


def test_credit_rows_of_a_capped_response_show_no_value():
    tokenizer, episode, _ = hand_credited_episode([0.75])  # only s_0 valued (the state cap)
    rows = vineppo.credit_rows(tokenizer, episode)
    assert rows[1]["value_before"] is None and rows[0]["value_after"] is None and rows[1]["advantage"] == 0.0
    assert "   - ->" in vineppo.format_credit(tokenizer, episode).splitlines()[2]


# --- the credit view in a run: its numbers are the advantages the update used
@pytest.fixture(scope="module", params=["mc", "value", "rloo", "mc-tokens"])
def credit_run(request, tmp_path_factory):
    """One iteration with --show-credit 2 on a random tiny model (parity-graded, see test_training), with
    ppo_update and print_credit wrapped to record what the update got and what the view showed."""
    critic, _, split = request.param.partition("-")
    out = tmp_path_factory.mktemp(f"credit-{request.param}")
    seen = {"updates": [], "shown": []}
    real_update, real_print = vineppo.ppo_update, vineppo.print_credit

    def recording_update(policy, value_model, optimizers, schedulers, batch, fixed, advantages, *rest):
        seen["updates"].append((advantages.clone(), {k: v.clone() for k, v in fixed.items()}))
        return real_update(policy, value_model, optimizers, schedulers, batch, fixed, advantages, *rest)

    def recording_print(tokenizer, episodes, problems, iteration, args):
        seen["shown"].append((tokenizer, episodes, problems, iteration))
        return real_print(tokenizer, episodes, problems, iteration, args)

    patch = pytest.MonkeyPatch()
    # graded by parity even when cut by the length limit (a random model rarely ends): groups get mixed rewards
    patch.setattr(vineppo, "reward_of", lambda task, text, ended, answer: parity_grader(text, answer))
    patch.setattr(vineppo, "ppo_update", recording_update)
    patch.setattr(vineppo, "print_credit", recording_print)
    flags = TINY_RUN + ["--iterations", "1", "--critic", critic, "--show-credit", "2", "--output-dir", str(out)]
    flags += ["--step-split", "tokens", "--step-chunk-tokens", "5"] if split else []
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:  # not a terminal
            result = vineppo.main(flags)
    finally:
        patch.undo()
    seen["stdout"] = stdout.getvalue()
    return request.param, out, seen, result


def test_credit_view_numbers_are_the_advantages_the_update_used(credit_run, capsys):
    name, _, seen, _ = credit_run
    assert len(seen["updates"]) == 1 and len(seen["shown"]) == 1
    (advantages, fixed), (tokenizer, episodes, _, _) = seen["updates"][0], seen["shown"][0]
    T = advantages.shape[1]
    for b, e in enumerate(episodes):
        n = len(e.response_ids)
        used = advantages[b, T - n:]  # this response's token advantages as given to ppo_update
        assert e.token_advantages == pytest.approx(used.tolist(), abs=1e-6)
        ends = e.step_starts[1:] + [n]
        for row, start, end in zip(vineppo.credit_rows(tokenizer, e), e.step_starts, ends):
            assert row["advantage"] == pytest.approx(used[start:end].mean().item(), abs=1e-6)
            if name.startswith("mc"):
                assert row["value_before"] is not None  # fewer than 25 states here
                assert row["advantage"] == pytest.approx(row["value_after"] - row["value_before"], abs=1e-6)
            elif name == "value":  # the critic's V(s) before the step's first token, as GAE used it
                assert row["value_before"] == pytest.approx(fixed["values_old"][b, T - n + start].item(), abs=1e-6)
            else:  # rloo: one advantage for every token, no value
                assert row["value_before"] is None
                assert used.unique().numel() == 1
        if name == "mc-tokens":
            assert e.step_starts == vineppo.chunk_starts(n - (not e.truncated), 5)
    if name == "rloo":  # each response's one advantage is RLOO's of its group
        expected = vineppo.group_advantages([e.reward for e in episodes], [e.problem_index for e in episodes], "rloo")
        assert [e.token_advantages[0] for e in episodes] == pytest.approx(expected)
        assert any(a != 0 for a in expected)


def test_show_credit_prints_n_responses_without_colour_off_a_terminal(credit_run):
    _, _, seen, _ = credit_run
    tokenizer, episodes, problems, iteration = seen["shown"][0]
    assert iteration == 1 and "credit view, iteration 1" in seen["stdout"]
    shown = vineppo.credit_examples(episodes, 2)
    assert len(shown) == 2
    for e in shown:
        assert vineppo.format_credit(tokenizer, e, problem=problems[e.problem_index]) in seen["stdout"]
    assert seen["stdout"].count("problem: ") == 2 and "\033[" not in seen["stdout"]


def test_credit_examples_prefer_failed_responses():
    def episode(problem, reward):
        return vineppo.Episode(problem, [], [], "", reward, False)
    batch = [episode(0, 1.0), episode(0, 1.0), episode(1, 1.0), episode(1, 0.0), episode(2, 0.0), episode(2, 1.0)]
    assert vineppo.credit_examples(batch, 2) == [batch[3], batch[4]]  # problems with a failure, first failure
    assert vineppo.credit_examples(batch, 3) == [batch[3], batch[4], batch[0]]  # then an all-right problem
    assert vineppo.credit_examples(batch, 0) == []


def test_show_credit_colours_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    tokenizer, episode, _ = hand_credited_episode([0.75, 0.0])
    monkeypatch.setattr(sys, "stdout", Terminal())
    args = vineppo.Args(show_credit=1, samples_per_prompt=1)
    vineppo.print_credit(tokenizer, [episode], [PROBLEM], 3, args)
    assert "\033[31m" in sys.stdout.getvalue()


# --- figures
def test_a_run_writes_curves_and_plot_overlays_runs(credit_run, tmp_path, capsys, monkeypatch):
    name, out, _, _ = credit_run
    assert ([str(out)], str(out / "curves.png")) in conftest.figures_asked  # what the run asked for, drawn here
    if name != "mc":
        return  # the figures do not depend on the critic: drawn once
    monkeypatch.setattr(vineppo, "plot_curves", conftest.REAL_PLOT_CURVES)
    png = b"\x89PNG\r\n\x1a\n"
    assert vineppo.plot_curves([str(out)], str(out / "curves.png")) == str(out / "curves.png")
    assert (out / "curves.png").read_bytes()[:8] == png
    figure = tmp_path / "both.png"
    result = vineppo.main(["--plot", str(out), str(out), "--output", str(figure)])
    assert result["figure"] == str(figure) and figure.read_bytes()[:8] == png
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        vineppo.main(["--plot", str(out), str(tmp_path / "nothing-here")])
    with pytest.raises(SystemExit, match="at least one run directory"):
        vineppo.main(["--plot", "--output", str(figure)])


def test_new_flags_are_checked():
    assert vineppo.parse_args(["--critic", "grpo"]).critic == "grpo"
    assert vineppo.parse_args(["--iterations", "0"]).iterations == 0
    for flags, message in [(["--step-split", "words"], "--step-split must be"),
                           (["--step-chunk-tokens", "0"], "--step-chunk-tokens must be at least 1"),
                           (["--show-credit", "-1"], "cannot be negative")]:
        with pytest.raises(SystemExit, match=message):
            vineppo.parse_args(flags)
