"""pi_old is what the PPO update assumes it is, and three rules of the update no other test pins.

Sampling: responses and MC rollouts come from the policy at temperature T and top_p, and from nothing else
(not from the generation settings saved with a checkpoint, not from the library's default top-k of 50).
Update (arXiv 2410.01679, appendix): token advantages whitened per minibatch; a minibatch whose mean ratio
pi / pi_old exceeds 10 skipped; the k3 KL to the reference summed per response and averaged over responses.
Each test names the bug it catches; every expected number is worked out here.

    cd <repo> && python -m pytest tests/test_pi_old.py -q
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return vineppo.build_tiny_tokenizer()


def fresh_model(tok):
    with torch.random.fork_rng():  # build_tiny_model seeds torch; keep the global RNG untouched
        return vineppo.build_tiny_model(tok, seed=0).eval()


# ============================================================================================
# Sampling: pi_old at temperature T with top_p, nothing else
# ============================================================================================
@pytest.mark.parametrize("setting, value", [("no_repeat_ngram_size", 1), ("repetition_penalty", 100.0),
                                            ("top_k", 1)])
def test_samples_ignore_generation_settings_saved_with_the_model(tok, setting, value):
    """A checkpoint's generation_config.json (Qwen2.5's sets repetition_penalty, top_k, ...) must not change
    the samples: with the setting saved on the model, every seed draws exactly what the clean model draws.
    Each seed alone tells the two apart (8 rows x 12 tokens), so this cannot pass by luck."""
    model = fresh_model(tok)
    prefixes = [tok.encode(vineppo.make_prompt("Start at 3: +4."), add_special_tokens=False)] * 8
    kwargs = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0, batch_size=8,
                  progress=False)

    def draw(seed):
        torch.manual_seed(seed)
        return vineppo.sample_continuations(model, prefixes, [12] * 8, **kwargs)

    with torch.random.fork_rng():
        clean = [draw(seed) for seed in range(4)]
        setattr(model.generation_config, setting, value)
        saved = model.generation_config
        polluted = [draw(seed) for seed in range(4)]
    assert polluted == clean
    assert model.generation_config is saved and getattr(saved, setting) == value  # the model's own is put back
    assert all(len({tuple(ids) for ids, _ in samples}) > 1 for samples in clean)  # really sampled, not greedy


def test_the_saved_generation_config_is_restored_after_an_error(tok, monkeypatch):
    """Catches a restore that is skipped when `generate` raises: the model keeps its own config either way."""
    model = fresh_model(tok)
    saved = model.generation_config

    def failing_generate(**kwargs):
        assert model.generation_config is not saved  # hidden while generate runs
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        vineppo.sample_continuations(model, [[5, 6, 7]], [4], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                     temperature=1.0, top_p=1.0, batch_size=1, progress=False)
    assert model.generation_config is saved


def test_no_top_k_cut(tok):
    """The tiny model at random init is near-uniform over its ~260 tokens (logit std ~0.2): at T = 1, top_p = 1,
    2,000 one-token samples hit nearly all of them (expected ~255 distinct). A top-k of 50 (transformers'
    default, applied unless top_k=0 is passed) would allow at most 50."""
    model = fresh_model(tok)
    prefix = tok.encode(vineppo.make_prompt("Start at 3: +4."), add_special_tokens=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        samples = vineppo.sample_continuations(model, [prefix] * 2000, [1] * 2000, eos_id=tok.eos_token_id,
                                               pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0,
                                               batch_size=2000, progress=False)
    assert len({ids[0] for ids, _ in samples}) > 200


# ============================================================================================
# The PPO update: whitening per minibatch, the ratio skip, the KL per response
# ============================================================================================
def batch_of(tok, response_lengths):
    """Hand-made episodes: a short prompt, then responses of the given lengths (distinct tokens per row)."""
    episodes = [vineppo.Episode(b, [10 + b, 20, 30], [40 + b + t for t in range(n)], "", 0.0, False)
                for b, n in enumerate(response_lengths)]
    return vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], tok.pad_token_id)


def run_update(policy, batch, advantages, *, logp_shift=0.0, ref_shift=0.0, **overrides):
    """One `ppo_update` with pi_old = the policy's own log-probs minus logp_shift (ratio e^logp_shift at the
    first step) and the reference = pi_old + ref_shift on every response token."""
    args = vineppo.Args(**{"epochs": 1, "minibatch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "temperature": 1.0,
                           **overrides})
    mask = batch["response_mask"]  # [B, T]
    logp = vineppo.response_logprobs(policy, vineppo.slice_batch(batch, torch.arange(len(mask)), "cpu"),
                                     args.temperature).detach()  # [B, T], zero at padding
    logp_old = (logp - logp_shift) * mask
    fixed = {"logp_old": logp_old, "logp_ref": (logp_old + ref_shift) * mask, "values_old": torch.zeros_like(mask)}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(mask) // args.minibatch_size)
    schedulers = [vineppo.warmup_linear_schedule(optimizer, steps, 0.0)]
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the minibatch shuffle
        return vineppo.ppo_update(policy, None, [optimizer], schedulers, batch, fixed, advantages * mask, None,
                                  args, torch.device("cpu"))


def test_advantages_are_whitened_per_minibatch(tok, monkeypatch):
    """Catches whitening over the whole batch then slicing: each minibatch's advantages, as the loss receives
    them, have mean 0 and variance 1 over its own response tokens. With one constant per response
    (0, 1, 5, 20) and two responses per minibatch, whole-batch whitening leaves minibatch means of -0.86 and 0.69 here."""
    received = []

    def recording_loss(logp, logp_old, advantages, mask, clip_range):
        received.append((advantages.detach().clone(), mask.clone()))
        return real_loss(logp, logp_old, advantages, mask, clip_range)

    real_loss = vineppo.ppo_policy_loss
    monkeypatch.setattr(vineppo, "ppo_policy_loss", recording_loss)
    batch = batch_of(tok, [3, 5, 4, 6])
    run_update(fresh_model(tok), batch, torch.tensor([0.0, 1.0, 5.0, 20.0])[:, None])
    assert len(received) == 2  # two minibatches of 2 responses, one micro-batch each
    for advantages, mask in received:
        n = mask.sum()
        mean = (advantages * mask).sum() / n
        variance = (((advantages - mean) * mask) ** 2).sum() / n
        assert abs(mean.item()) < 1e-5 and variance.item() == pytest.approx(1.0, abs=1e-4)


def test_a_minibatch_with_mean_ratio_above_10_is_skipped(tok):
    """Catches a missing or broken skip: pi_old 3 nats below the policy (ratio e^3 ~ 20 on every token)
    makes every minibatch count as skipped, and no parameter moves (with the skip gone, lr 1e-3 moves them)."""
    policy = fresh_model(tok)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    batch = batch_of(tok, [3, 5, 4, 6])
    out = run_update(policy, batch, torch.tensor([-1.0, 1.0, -2.0, 2.0])[:, None], logp_shift=3.0, kl_coef=0.1)
    assert out["losses/skipped_minibatches"] == 2
    assert all(torch.equal(p, before[name]) for name, p in policy.named_parameters())


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_kl_is_summed_per_response_and_averaged_over_responses(tok, micro_batch_size):
    """Catches a per-token mean (1 x k3) or a plain sum (10 x k3): responses of 3 and 7 tokens, the reference
    0.5 nats above pi_old on every token, so k3 = e^0.5 - 0.5 - 1 per token and the KL term is
    (3 k3 + 7 k3) / 2 responses = 5 k3, however the minibatch is split into micro-batches."""
    k3 = torch.exp(torch.tensor(0.5)).item() - 0.5 - 1
    batch = batch_of(tok, [3, 7])
    out = run_update(fresh_model(tok), batch, torch.tensor([1.0, -1.0])[:, None], ref_shift=0.5,
                     micro_batch_size=micro_batch_size)
    assert out["losses/kl"] == pytest.approx((3 + 7) / 2 * k3, rel=1e-4)
