"""Tests of the algorithmic pieces of vineppo.py, each on small hand-made inputs.

Every expected number is either worked out by hand in the test (from the rule in the paper, arXiv 2410.01679, /
the docstring) or computed by an independent reference written here (plain floats, exact binomial sums,
byte offsets); nothing is copied from the function's own output.

    cd <repo> && python -m pytest tests/test_algorithm.py -q
"""

import bisect
import doctest
import functools
import hashlib
import inspect
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402

QWEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "qwen2.5-tokenizer"
needs_qwen = pytest.mark.skipif(not QWEN_DIR.is_dir(), reason=f"real Qwen2.5 tokenizer not found at {QWEN_DIR}")


# ============================================================================================
# Helpers: an independent oracle for "which step holds a token's first character"
# ============================================================================================
def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table: byte-level token characters -> raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_DECODER = _gpt2_byte_decoder()


def byte_level_token_bytes(tok):
    """Raw bytes of one token of a byte-level BPE tokenizer (special tokens contribute no bytes)."""
    special = set(tok.all_special_ids)
    return lambda tid: b"" if tid in special else bytes(BYTE_DECODER[c] for c in tok.convert_ids_to_tokens(tid))


def first_chars(token_bytes, ids: list[int], text: str) -> list[int]:
    """Index of the character of `text` that holds each token's FIRST BYTE (len(text) for a trailing EOS)."""
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")] + [len(text)]
    out, offset, joined = [], 0, b""
    for tid in ids:
        out.append(char_of_byte[offset])
        piece = token_bytes(tid)
        joined += piece
        offset += len(piece)
    assert joined == text.encode("utf-8"), "oracle: the tokens must spell the text"
    return out


def oracle_starts(token_bytes, ids: list[int], steps: list[str]) -> tuple[list[int], list[int]]:
    """Expected step starts by the rule: a token belongs to the step that holds its first character; a
    new step begins wherever that step changes (steps owning no token vanish). Also returns each token's step."""
    text = "".join(steps)
    char_starts = [sum(len(s) for s in steps[:i]) for i in range(len(steps))]
    step_of = [bisect.bisect_right(char_starts, c) - 1 for c in first_chars(token_bytes, ids, text)]
    return [0] + [j for j in range(1, len(ids)) if step_of[j] != step_of[j - 1]], step_of


def check_step_mapping(decode, token_bytes, ids, steps):
    """The invariants of step_token_starts on one response; returns the starts."""
    starts = vineppo.step_token_starts(decode, ids, steps)
    assert starts[0] == 0
    assert all(a < b for a, b in zip(starts, starts[1:])), starts
    assert all(t < len(ids) for t in starts) or ids == []
    expected, step_of = oracle_starts(token_bytes, ids, steps)
    assert starts == expected
    # the step a token gets (bisect on the starts) is the step holding its first character
    group_steps = [step_of[t] for t in starts]
    for j in range(len(ids)):
        assert group_steps[bisect.bisect_right(starts, j) - 1] == step_of[j], j
    # every state ids[:t] is the trajectory's own prefix, and its text is a prefix of the response
    text = "".join(steps)
    for t in starts:
        assert text.startswith(decode(ids[:t]))
    return starts


# ============================================================================================
# 1. split_steps
# ============================================================================================
@pytest.mark.parametrize("text, expected", [
    ("\n7+5=12\n12*3=36\n#### 36\n", ["\n7+5=12", "\n12*3=36\n#### 36\n"]),  # the docstring example
    ("a=1\nb=2\nc=3", ["a=1", "\nb=2", "\nc=3"]),  # one step per line, later ones carry their newline
    ("\n\n\na=1\nb=2", ["\n\n\na=1", "\nb=2"]),  # leading empty lines go into the first step
    ("a=1\n\n\nb=2", ["a=1", "\n\n\nb=2"]),  # blank lines go into the step after them
    ("a=1\n  \n\tb=2", ["a=1", "\n  \n\tb=2"]),  # whitespace-only lines count as blank
    ("a=1\nb=2\n\n\n", ["a=1", "\nb=2\n\n\n"]),  # trailing blank lines: no step after, so the last
    ("just one line", ["just one line"]),  # no newline at all
    ("#### 42", ["#### 42"]),  # only an answer line
    ("\n#### 42\n", ["\n#### 42\n"]),
    ("a=1\n#### 1", ["a=1\n#### 1"]),  # the answer line merges into the last step
    ("a=1\n\n#### 1", ["a=1\n\n#### 1"]),  # ... with the blank line before it
    ("a=1\n  #### 1", ["a=1\n  #### 1"]),  # indented answer line
    ("a=1\n#### 1\nThe end.", ["a=1\n#### 1\nThe end."]),  # text after the answer merges too
    ("a=1\n#### 1\n\nThe end.", ["a=1\n#### 1\n\nThe end."]),
    ("", [""]),  # always at least one step
    ("   ", ["   "]),
    ("\n\n", ["\n\n"]),
    ("½ × 3 = 1.5\n1.5 + 1 = 2.5 🙂\n中文步骤\n#### 2.5", ["½ × 3 = 1.5", "\n1.5 + 1 = 2.5 🙂", "\n中文步骤\n#### 2.5"]),
    ("a=1\r\nb=2\r\n#### 2", ["a=1\r", "\nb=2\r\n#### 2"]),  # CRLF: the cut is at '\n', '\r' ends the line
])
def test_split_steps_gsm8k_rule(text, expected):
    """Exact steps, worked out by hand from the GSM8K rule; the steps re-join to the text."""
    steps = vineppo.split_steps(text)
    assert steps == expected
    assert "".join(steps) == text


def test_split_steps_merges_everything_after_the_answer_line():
    """'the #### answer line and anything after it merge into the last step' also holds for 2+ lines after it."""
    assert vineppo.split_steps("a=1\n#### 1\nfoo\nbar") == ["a=1\n#### 1\nfoo\nbar"]
    assert vineppo.split_steps("#### 1\nfoo\nbar") == ["#### 1\nfoo\nbar"]


def test_split_steps_rejoins_random_texts():
    """On random texts over a newline-heavy alphabet the steps always re-join exactly, never empty,
    and every step after the first begins with a newline."""
    rng = random.Random(0)
    alphabet = ["\n", "\n", " ", "a", "1", "=", "#", "####", "\r", "é", "🙂"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        steps = vineppo.split_steps(text)
        assert "".join(steps) == text
        assert len(steps) >= 1
        assert all(step.startswith("\n") for step in steps[1:])
        assert all(step for step in steps) or steps == [""]


# ============================================================================================
# 2. step_token_starts: text boundaries -> token positions
# ============================================================================================
def test_step_token_starts_hand_made_tokens_spanning_and_swallowed_steps():
    """Hand-made tokens: a token spanning a boundary stays with the step it starts in, and a step
    that owns no token (swallowed by one token) disappears."""
    text = "a.\nb.\nc\nd"
    steps = vineppo.split_steps(text)
    assert steps == ["a.", "\nb.", "\nc", "\nd"]
    pieces = ["a", ".\nb.\n", "c", "\n", "d"]  # token 1 starts in step 0 and swallows all of step 1
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = list(range(len(pieces)))
    starts = vineppo.step_token_starts(decode, ids, steps)
    assert starts == [0, 2, 3]  # step 2 begins at "c"; step 3 at "\n"; step 1 owns no token
    assert starts == check_step_mapping(decode, lambda i: pieces[i].encode(), ids, steps)


def test_step_token_starts_boundary_token_at_step_start():
    """A token that starts exactly at a step's first character (its newline) begins that step."""
    pieces = ["x=1", "\n", "y=2", "\ny", "=3"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    steps = ["x=1", "\ny=2", "\ny=3"]
    assert vineppo.step_token_starts(decode, [0, 1, 2, 3, 4], steps) == [0, 1, 3]


def test_step_token_starts_char_tokenizer_positions_equal_char_positions():
    """With one token per character the step starts are the steps' character offsets (EOS included)."""
    tok = vineppo.build_tiny_tokenizer()
    text = "\n\n3+4=7\n\n7*6=42\n42-1=41\n#### 41\n"
    steps = vineppo.split_steps(text)
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert len(ids) == len(text) + 1
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    starts = vineppo.step_token_starts(decode, ids, steps)
    assert starts == [0, 7, 15]  # "\n\n3+4=7" | "\n\n7*6=42" | "\n42-1=41\n#### 41\n"
    assert starts == [sum(len(s) for s in steps[:i]) for i in range(len(steps))]
    check_step_mapping(decode, byte_level_token_bytes(tok), ids, steps)


def test_step_token_starts_single_step_and_empty_response():
    """One step -> [0]; an empty response (only EOS, or nothing) -> [0]."""
    tok = vineppo.build_tiny_tokenizer()
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    ids = tok.encode("#### 5", add_special_tokens=False)
    assert vineppo.step_token_starts(decode, ids, ["#### 5"]) == [0]
    assert vineppo.step_token_starts(decode, [tok.eos_token_id], [""]) == [0]
    assert vineppo.step_token_starts(decode, [], [""]) == [0]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained in-process on GSM8K-like lines, without the GPT-2 split regex, so that
    merges cross newlines (tokens like ' apples.\\nHe buys ' span a step boundary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = []
    for _ in range(300):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        corpus.append(f"Tom has {a} apples.\nHe buys {b} more: {a}+{b}={a + b}.\n#### {a + b}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>"], show_progress=False)
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False,
                                   eos_token="<eos>", pad_token="<pad>")


def _spanning_tokens(token_bytes, ids, steps):
    """(token index, step it starts in) for every token whose characters lie in two or more steps."""
    text = "".join(steps)
    char_starts = [sum(len(s) for s in steps[:i]) for i in range(len(steps))]
    firsts = first_chars(token_bytes, ids, text) + [len(text)]
    out = []
    for j in range(len(ids)):
        if firsts[j + 1] > firsts[j]:
            a = bisect.bisect_right(char_starts, firsts[j]) - 1
            b = bisect.bisect_right(char_starts, firsts[j + 1] - 1) - 1
            if a != b:
                out.append((j, a))
    return out


def test_step_token_starts_bpe_token_spanning_a_boundary(bpe_tokenizer):
    """Byte-level BPE: a merged token that crosses a step boundary stays with the step it starts in, so the
    next step begins AFTER it; every state prefix is the trajectory's own ids (not re-tokenized text)."""
    tok = bpe_tokenizer
    text = "Tom has 12 apples.\nHe buys 30 more: 12+30=42.\n#### 42"
    steps = vineppo.split_steps(text)
    assert len(steps) == 2
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    token_bytes = byte_level_token_bytes(tok)
    spanning = _spanning_tokens(token_bytes, ids, steps)
    assert spanning, f"precondition: some token should span the boundary, got {tok.convert_ids_to_tokens(ids)}"
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    starts = check_step_mapping(decode, token_bytes, ids, steps)
    j, step = spanning[0]
    assert step == 0 and starts[1] == j + 1  # step 1 begins right after the spanning token
    state_text = decode(ids[:starts[1]])
    assert len(state_text) > len(steps[0])  # the state holds the boundary token whole, newline included
    # re-tokenizing the first step's text would NOT give the trajectory's prefix: offsets are needed
    assert tok.encode(steps[0], add_special_tokens=False) != ids[:starts[1]]


def test_step_token_starts_bpe_many_lines(bpe_tokenizer):
    """Byte-level BPE on a longer response with blank lines: the mapping follows the first-character rule."""
    tok = bpe_tokenizer
    text = "\nTom has 7 apples.\n\nHe buys 5 more: 7+5=12.\nTom has 12 apples.\n#### 12\n"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    starts = check_step_mapping(decode, byte_level_token_bytes(tok), ids, vineppo.split_steps(text))
    assert len(starts) >= 2


def test_step_token_starts_bpe_multibyte_char_before_newline(bpe_tokenizer):
    """A line ending in a character split into several byte tokens ('€' = 3 byte tokens here): all of its
    bytes belong to the step holding it; the next step begins at the newline."""
    tok = bpe_tokenizer
    text = "cost 5€\nnext €\n#### 5"
    ids = tok.encode(text, add_special_tokens=False)
    assert sum(tok.convert_ids_to_tokens(i) in ("â", "Ĥ", "¬") for i in ids) == 6  # precondition: '€' is 3 tokens
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    check_step_mapping(decode, byte_level_token_bytes(tok), ids, vineppo.split_steps(text))


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(QWEN_DIR))


@needs_qwen
def test_step_token_starts_qwen_gsm8k_text(qwen_tokenizer):
    """Real Qwen2.5 tokenizer on GSM8K-style text: '.\\n', '.\\n\\n' and ':\\n' are single tokens that
    span step boundaries; each stays with the step it starts in."""
    tok = qwen_tokenizer
    text = ("\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n\n"
            "So the total is:\n72 clips.\n#### 72")
    steps = vineppo.split_steps(text)
    assert len(steps) == 4
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    pieces = tok.convert_ids_to_tokens(ids)
    assert {".Ċ", ".ĊĊ", ":Ċ"} <= set(pieces), pieces  # precondition: boundary-spanning tokens exist
    token_bytes = byte_level_token_bytes(tok)
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    starts = check_step_mapping(decode, token_bytes, ids, steps)
    assert len(starts) == 4
    for j, step in _spanning_tokens(token_bytes, ids, steps):
        assert starts[step + 1] == j + 1  # each boundary comes right after its spanning token


@needs_qwen
def test_step_token_starts_qwen_emoji_at_line_end(qwen_tokenizer):
    """Real Qwen2.5 tokenizer: an emoji split into byte tokens at the end of a line stays in its step."""
    tok = qwen_tokenizer
    text = "Great job 🎉\nnext 龘\n#### 1"
    ids = tok.encode(text, add_special_tokens=False)
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    check_step_mapping(decode, byte_level_token_bytes(tok), ids, vineppo.split_steps(text))


# ============================================================================================
# 3-4. step and token advantages
# ============================================================================================
def test_step_advantages_hand_computed():
    """A_i = V(s_{i+1}) - V(s_i), A_{n-1} = R - V(s_{n-1})."""
    assert vineppo.step_advantages([0.5, 0.25, 1.0], 1.0) == pytest.approx([-0.25, 0.75, 0.0])
    assert vineppo.step_advantages([0.5, 0.25, 1.0], 0.0) == pytest.approx([-0.25, 0.75, -1.0])
    assert vineppo.step_advantages([0.2, 0.6], 1.0) == pytest.approx([0.4, 0.4])


def test_step_advantages_single_step():
    """One step: A_0 = R - V(s_0)."""
    assert vineppo.step_advantages([0.3], 1.0) == pytest.approx([0.7])
    assert vineppo.step_advantages([0.3], 0.0) == pytest.approx([-0.3])


def test_step_advantages_telescope_to_return_minus_first_value():
    """sum_i A_i = R - V(s_0) for random values; and NOT every step gets R - V(s_i)."""
    rng = random.Random(1)
    for _ in range(100):
        values = [rng.random() for _ in range(rng.randint(1, 12))]
        reward = float(rng.random() < 0.5)
        advs = vineppo.step_advantages(values, reward)
        assert len(advs) == len(values)
        assert sum(advs) == pytest.approx(reward - values[0], abs=1e-12)
        for i, a in enumerate(advs):
            nxt = values[i + 1] if i + 1 < len(values) else reward
            assert a == pytest.approx(nxt - values[i], abs=1e-12)


def test_token_advantages_each_token_takes_its_step():
    """Tokens [0,3) get A_0, [3,5) get A_1, [5,7) get A_2; the final (EOS) token gets the last step's."""
    out = vineppo.token_advantages([0.1, -0.2, 0.3], [0, 3, 5], 7)
    assert out == [0.1, 0.1, 0.1, -0.2, -0.2, 0.3, 0.3]
    assert vineppo.token_advantages([0.5], [0], 4) == [0.5] * 4
    assert vineppo.token_advantages([0.5, -0.5], [0, 1], 2) == [0.5, -0.5]


# ============================================================================================
# 5. whitening
# ============================================================================================
def test_whiten_masked_entries_only():
    """(A - mean) / sqrt(var + 1e-8) over the mask (population variance); padding stays 0 and its values
    do not matter."""
    values = torch.tensor([[123.0, 1.0, 2.0, 3.0], [-77.0, 9e6, 6.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    out = vineppo.whiten(values, mask)
    real = [1.0, 2.0, 3.0, 6.0, 7.0]
    mean, var = statistics.fmean(real), statistics.pvariance(real)
    expected = [(x - mean) / math.sqrt(var + 1e-8) for x in real]
    assert out[mask.bool()].tolist() == pytest.approx(expected, abs=1e-9)
    assert out[~mask.bool()].tolist() == [0.0, 0.0, 0.0]
    masked = out[mask.bool()]
    assert masked.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert (masked ** 2).mean().item() == pytest.approx(1.0, abs=1e-6)


# ============================================================================================
# 6. GAE (the PPO baseline's credit)
# ============================================================================================
def test_gae_gamma_lambda_one_gives_return_minus_value():
    """gamma = lambda = 1, reward R on the last token: A_t = R - V(s_t), returns = R at every token."""
    values = torch.tensor([[0.1, 0.4, 0.8, 0.3]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    mask = torch.ones_like(values)
    adv, ret = vineppo.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.9, 0.6, 0.2, 0.7])
    assert ret[0].tolist() == pytest.approx([1.0] * 4)


def test_gae_hand_computed_discounted():
    """gamma = 0.9, lambda = 0.5 on 3 tokens, worked by hand:
    delta = [0.9*0.5-0.2, 0.9*0.7-0.5, 1-0.7] = [0.25, 0.13, 0.3];
    A_2 = 0.3, A_1 = 0.13 + 0.45*0.3 = 0.265, A_0 = 0.25 + 0.45*0.265 = 0.36925."""
    values = torch.tensor([[0.2, 0.5, 0.7]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    adv, ret = vineppo.gae_advantages(rewards, values, torch.ones_like(values), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.36925, 0.265, 0.3], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.56925, 0.765, 1.0], abs=1e-12)


def test_gae_left_padding_stays_zero_and_does_not_leak():
    """Right-aligned rows: garbage values/rewards in the padding on the left change nothing in the real
    tokens, and the padding's advantages and returns are 0."""
    values = torch.tensor([[0.2, 0.5, 0.7]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    alone, alone_ret = vineppo.gae_advantages(rewards, values, torch.ones_like(values), gamma=0.9, lam=0.5)
    padded_values = torch.tensor([[55.0, -3.0, 0.2, 0.5, 0.7]], dtype=torch.float64)
    padded_rewards = torch.tensor([[7.0, 1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.float64)
    adv, ret = vineppo.gae_advantages(padded_rewards, padded_values, mask, gamma=0.9, lam=0.5)
    assert adv[0, 2:].tolist() == pytest.approx(alone[0].tolist(), abs=1e-12)
    assert ret[0, 2:].tolist() == pytest.approx(alone_ret[0].tolist(), abs=1e-12)
    assert adv[0, :2].tolist() == [0.0, 0.0] and ret[0, :2].tolist() == [0.0, 0.0]


# ============================================================================================
# 7-9. losses
# ============================================================================================
EPS = 0.2
# (advantage, ratio, clipping binds?) -- ratios inside, beyond both bounds, for both signs of A
POLICY_CASES = [
    (1.5, 1.0, False), (1.5, 1.1, False), (1.5, 0.5, False), (1.5, 1.5, True), (1.5, 3.0, True),
    (-0.7, 1.0, False), (-0.7, 0.9, False), (-0.7, 1.5, False), (-0.7, 0.5, True), (-0.7, 0.1, True),
]


def _reference_policy_loss(adv: float, rho: float) -> float:
    return max(-adv * rho, -adv * min(max(rho, 1 - EPS), 1 + EPS))


def test_ppo_policy_loss_values_and_gradients():
    """Per token max(-A rho, -A clip(rho)); the gradient w.r.t. logp is 0 where clipping binds and
    -A*rho (the unclipped surrogate's) elsewhere; the 'clipped' statistic counts binding tokens."""
    adv = torch.tensor([[a for a, _, _ in POLICY_CASES]], dtype=torch.float64)
    logp_old = torch.full_like(adv, -1.3)
    logp = (logp_old + torch.tensor([[math.log(r) for _, r, _ in POLICY_CASES]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones_like(adv)
    losses, stats = vineppo.ppo_policy_loss(logp, logp_old, adv, mask, EPS)
    expected = [_reference_policy_loss(a, r) for a, r, _ in POLICY_CASES]
    assert losses[0].tolist() == pytest.approx(expected, abs=1e-12)
    losses.sum().backward()
    for (a, r, binds), g in zip(POLICY_CASES, logp.grad[0].tolist()):
        if binds:
            assert g == 0.0, (a, r)
        else:
            assert g == pytest.approx(-a * r, abs=1e-12) and g != 0.0, (a, r)
    assert stats["clipped"] == sum(binds for _, _, binds in POLICY_CASES)
    assert stats["ratio_sum"] == pytest.approx(sum(r for _, r, _ in POLICY_CASES))


@pytest.mark.parametrize("adv", [1.5, -0.7])
@pytest.mark.parametrize("rho", [1 - EPS, 1 + EPS])
def test_ppo_policy_loss_exactly_at_clip_bounds(adv, rho):
    """At rho = 1 +- eps the clipped and unclipped surrogates agree: loss = -A * rho."""
    logp_old = torch.tensor([[-2.0]], dtype=torch.float64)
    logp = logp_old + math.log(rho)
    losses, _ = vineppo.ppo_policy_loss(logp, logp_old, torch.tensor([[adv]], dtype=torch.float64),
                                        torch.ones(1, 1, dtype=torch.float64), EPS)
    assert losses.item() == pytest.approx(-adv * rho, abs=1e-12)


def test_ppo_policy_loss_padding_with_garbage_is_zero_and_finite():
    """Padding positions with garbage log-probs (+-1000) and advantages give loss 0 and finite gradients."""
    logp = torch.tensor([[1000.0, -1000.0, -1.0, -2.0]], requires_grad=True)
    logp_old = torch.tensor([[-1000.0, 1000.0, -1.0, -2.1]])
    adv = torch.tensor([[5.0, -5.0, 1.0, -1.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    losses, stats = vineppo.ppo_policy_loss(logp, logp_old, adv, mask, EPS)
    assert torch.isfinite(losses).all()
    assert losses[0, :2].tolist() == [0.0, 0.0]
    assert losses[0, 2].item() == pytest.approx(-1.0)
    assert losses[0, 3].item() == pytest.approx(math.exp(0.1), rel=1e-6)  # A=-1, rho=e^0.1 inside the clip
    losses.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, :2].tolist() == [0.0, 0.0]
    assert math.isfinite(stats["ratio_sum"])


def test_k3_kl_formula_zero_and_direction():
    """k3 = exp(d) - d - 1 with d = logp_ref - logp; zero where the log-probs agree; padding is 0."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, 9.0]], dtype=torch.float64)
    d = [0.0, 0.3, -0.3, 1.5, 0.7]
    logp_ref = logp + torch.tensor([d], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.float64)
    out = vineppo.k3_kl(logp, logp_ref, mask)
    assert out[0].tolist() == pytest.approx([math.exp(x) - x - 1 for x in d[:4]] + [0.0], abs=1e-12)
    assert out[0, 0].item() == 0.0


def test_k3_kl_expectation_is_kl_policy_to_reference():
    """Averaged under tokens drawn from pi, k3 equals KL(pi || pi_ref) exactly (checked by enumeration)."""
    p = [0.7, 0.2, 0.1]
    q = [0.2, 0.3, 0.5]
    logp = torch.tensor([[math.log(x) for x in p]], dtype=torch.float64)
    logp_ref = torch.tensor([[math.log(x) for x in q]], dtype=torch.float64)
    k3 = vineppo.k3_kl(logp, logp_ref, torch.ones_like(logp))[0].tolist()
    expected_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert sum(pi * k for pi, k in zip(p, k3)) == pytest.approx(expected_kl, abs=1e-12)


def test_k3_kl_nonnegative_and_clamped_on_a_grid():
    """Never negative, never above 10, 10 for large |d|, finite for huge differences."""
    d = torch.cat([torch.linspace(-60, 60, 2401, dtype=torch.float64), torch.tensor([-1e4, -1e3, 1e3, 1e4], dtype=torch.float64)])
    logp = torch.linspace(-5, 0, len(d), dtype=torch.float64)
    out = vineppo.k3_kl(logp, logp + d, torch.ones_like(d))
    assert torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 10).all()
    big = d.abs() >= 20  # exp(d) - d - 1 > 10 there for either sign
    assert (out[big] == 10).all()
    small = d.abs() <= 2
    assert out[small].tolist() == pytest.approx([math.exp(x) - x - 1 for x in d[small].tolist()], abs=1e-9)


def test_k3_kl_astronomical_difference_still_clamps_to_ten():
    """k3 is increasing in d > 0, so a gigantic d must still give the clamp value 10."""
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    logp_ref = torch.tensor([[1e9, float("inf")]], dtype=torch.float64)
    assert vineppo.k3_kl(logp, logp_ref, torch.ones_like(logp))[0].tolist() == [10.0, 10.0]


def test_value_loss_hand_computed():
    """0.5 * max((V - ret)^2, (clip(V, V_old +- 0.2) - ret)^2), worked by hand:
    V=0.5, V_old=0.2, ret=1 -> clip 0.4: max(0.25, 0.36) -> 0.18 (clipped term wins);
    V=0.5, V_old=0.2, ret=0 -> max(0.25, 0.16) -> 0.125 (unclipped wins);
    V=0.3, V_old=0.2, ret=1 -> inside the clip: 0.5*0.49 = 0.245;
    V=-0.4, V_old=0.0, ret=0.5 -> clip -0.2: max(0.81, 0.49) -> 0.405; masked -> 0."""
    values = torch.tensor([[0.5, 0.5, 0.3, -0.4, 3.0]], dtype=torch.float64)
    values_old = torch.tensor([[0.2, 0.2, 0.2, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.float64)
    out = vineppo.value_loss(values, values_old, returns, mask, 0.2)
    assert out[0].tolist() == pytest.approx([0.18, 0.125, 0.245, 0.405, 0.0], abs=1e-12)


# ============================================================================================
# 10. Monte Carlo values
# ============================================================================================
def test_mc_values_dedupes_and_rolls_out_everything_in_one_call():
    """Identical states are rolled out once, K times each, all in ONE rollout call; V = mean of its K."""
    calls = []
    table = {(1, 2): [1.0, 0.0, 1.0], (1, 2, 3): [0.0, 0.0, 0.0], (5,): [1.0, 1.0, 1.0]}

    def rollout(prefixes):
        calls.append(list(prefixes))
        seen = {}
        out = []
        for p in prefixes:
            out.append(table[p][seen.get(p, 0)])
            seen[p] = seen.get(p, 0) + 1
        return out

    states = [(1, 2), (1, 2, 3), (1, 2), (5,), tuple([1, 2]), (1, 2, 3)]
    values, per_state = vineppo.mc_values(states, 3, rollout)
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted([s for s in table for _ in range(3)])
    assert values == pytest.approx({(1, 2): 2 / 3, (1, 2, 3): 0.0, (5,): 1.0})
    assert per_state == {s: table[s] for s in table}


COIN_P, COIN_TARGET = 0.3, 2  # toy environment: flip a p=0.3 coin until no steps are left; reward 1 iff heads >= 2


def _coin_true_value(heads: int, steps_left: int) -> float:
    return sum(math.comb(steps_left, j) * COIN_P ** j * (1 - COIN_P) ** (steps_left - j)
               for j in range(steps_left + 1) if heads + j >= COIN_TARGET)


def _coin_rollout(rng: random.Random):
    def rollout(prefixes):
        return [float(h + sum(rng.random() < COIN_P for _ in range(n)) >= COIN_TARGET) for h, n in prefixes]
    return rollout


def test_mc_values_unbiased_with_binomial_variance():
    """On a coin game with exactly known values: the mean of many independent K=3 estimates is within 4
    standard errors of V(s), and their variance is V(1-V)/K (K, not K+1: nothing but the K rollouts)."""
    k, repeats = 3, 3000
    states = [(0, 4), (1, 3), (0, 2), (1, 1), (2, 0), (0, 1), (0, 4)]
    rollout = _coin_rollout(random.Random(12345))
    estimates = {s: [] for s in states}
    for _ in range(repeats):
        values, _ = vineppo.mc_values(states, k, rollout)
        for s, v in values.items():
            estimates[s].append(v)
    for s, est in estimates.items():
        truth = _coin_true_value(*s)
        if truth in (0.0, 1.0):
            assert set(est) == {truth}, s  # a certain outcome is estimated exactly
            continue
        stderr = math.sqrt(truth * (1 - truth) / (k * repeats))
        assert abs(statistics.fmean(est) - truth) < 4 * stderr, (s, statistics.fmean(est), truth)
        assert statistics.pvariance(est) == pytest.approx(truth * (1 - truth) / k, rel=0.15), s


def test_mc_values_uses_only_the_rollouts():
    """The estimator's inputs are the states, K and the sampler; nothing about the response (its reward)."""
    assert list(inspect.signature(vineppo.mc_values).parameters) == ["states", "k", "rollout"]
    values, _ = vineppo.mc_values([(0, 4), (2, 0)], 5, lambda prefixes: [0.0] * len(prefixes))
    assert values == {(0, 4): 0.0, (2, 0): 0.0}  # even a winning state is 0 if its rollouts all fail


def test_assign_mc_advantages_rolls_out_trajectory_prefixes(monkeypatch, bpe_tokenizer):
    """The wiring of VinePPO's credit with a fake sampler: states are prompt + the response's OWN first t
    tokens (not re-tokenized step text), identical states are shared by responses, continuations use the
    sampling settings of the responses and the remaining length budget, prefix+continuation is graded (an
    answer may straddle the boundary), a cut continuation scores 0, and V never contains the response's
    own reward."""
    tok = bpe_tokenizer
    args = vineppo.Args(mc_rollouts=3, max_new_tokens=60, temperature=0.6, top_p=0.9, rollout_batch_size=7)
    problems = [{"problem": "p", "answer": "42"}]
    prompt = tok.encode("Q: 12+30?\n", add_special_tokens=False)
    decode = lambda ids: vineppo.decode_response(tok, ids)  # noqa: E731
    texts = ["Tom has 12 apples.\nHe buys 30 more: 12+30=42.\n#### 41", "Tom has 12 apples.\n#### 42"]
    episodes = []
    for text, reward in zip(texts + texts[1:], [0.0, 1.0, 1.0]):  # response 0 is wrong, 1 and 2 are right
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        steps = vineppo.split_steps(text)
        starts = vineppo.step_token_starts(decode, ids, steps)
        episodes.append(vineppo.Episode(0, prompt, ids, text, reward, False, steps=steps, step_starts=starts))
    e0, e1, e2 = episodes
    assert len(e0.step_starts) == 2 and e1.step_starts == [0]
    # response 2: a hand-set boundary inside the answer, so the answer straddles state and continuation
    cut = next(t for t in range(len(e2.response_ids)) if decode(e2.response_ids[:t]).endswith("#### 4"))
    e2.step_starts = [0, cut]
    s0 = tuple(prompt)
    s1 = tuple(prompt + e0.response_ids[:e0.step_starts[1]])
    s2 = tuple(prompt + e2.response_ids[:cut])
    assert s1 != tuple(prompt + tok.encode(e0.steps[0], add_special_tokens=False))  # precondition: BPE differs
    enc = lambda s: tok.encode(s, add_special_tokens=False) + [tok.eos_token_id]  # noqa: E731
    script = {  # state -> its K continuations (ids, ended_with_eos)
        s0: [(enc("So #### 42"), True), (enc("So #### 7"), True), (tok.encode("So #### 42", add_special_tokens=False), False)],
        s1: [(enc("12+30=42.\n#### 42"), True), (enc("#### 4,2"), True), (enc("#### 40"), True)],
        s2: [(enc("2"), True), (enc("2"), True), (enc("0"), True)],  # graded as "#### 42", "#### 42", "#### 40"
    }
    calls = []

    def fake_sample_continuations(model, prefixes, budgets, *, eos_id, pad_id, temperature, top_p, batch_size, **kw):
        calls.append(dict(prefixes=[tuple(p) for p in prefixes], budgets=budgets, eos_id=eos_id, pad_id=pad_id,
                          temperature=temperature, top_p=top_p, batch_size=batch_size))
        used = {}
        out = []
        for p in map(tuple, prefixes):
            out.append(script[p][used.get(p, 0)])
            used[p] = used.get(p, 0) + 1
        return out

    monkeypatch.setattr(vineppo, "sample_continuations", fake_sample_continuations)
    stats = vineppo.assign_mc_advantages(None, tok, episodes, problems, args)
    assert len(calls) == 1
    call = calls[0]
    assert sorted(call["prefixes"]) == sorted([s0] * 3 + [s1] * 3 + [s2] * 3)  # s0 shared by all, rolled out once
    assert call["budgets"] == [args.max_new_tokens - (len(p) - len(prompt)) for p in call["prefixes"]]
    assert (call["temperature"], call["top_p"], call["eos_id"]) == (0.6, 0.9, tok.eos_token_id)
    v0, v1, v2 = 1 / 3, 2 / 3, 2 / 3  # s0: right, wrong, cut (0); s1: right, "4,2" -> 42 right, wrong; s2 above
    assert e0.step_values == pytest.approx([v0, v1])
    assert e1.step_values == pytest.approx([v0])  # the right responses do not raise V(s0)
    assert e2.step_values == pytest.approx([v0, v2])
    n1 = e0.step_starts[1]
    assert e0.token_advantages == pytest.approx([v1 - v0] * n1 + [0.0 - v1] * (len(e0.response_ids) - n1))
    assert e1.token_advantages == pytest.approx([1.0 - v0] * len(e1.response_ids))
    assert stats["mc/states"] == 3


def test_assign_mc_advantages_caps_the_valued_states(monkeypatch):
    """The official cap: only the first max_states_per_response states are rolled out; every later state gets
    V = R, so the last valued step gets R - V(s_last) and the steps after it 0."""
    tok = vineppo.build_tiny_tokenizer()
    args = vineppo.Args(mc_rollouts=2, max_new_tokens=60, max_states_per_response=2)
    prompt = tok.encode("Q\n", add_special_tokens=False)
    text = "\n1+1=2\n2+1=3\n3+1=4\n#### 4\n"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    steps = vineppo.split_steps(text)
    starts = vineppo.step_token_starts(functools.partial(vineppo.decode_response, tok), ids, steps)
    episode = vineppo.Episode(0, prompt, ids, text, 1.0, False, steps=steps, step_starts=starts)
    assert len(starts) == 3
    rolled = []

    def fake(model, prefixes, budgets, **kw):
        rolled.extend(map(tuple, prefixes))
        return [((tok.encode("#### 4", add_special_tokens=False) if len(p) == len(prompt) else []) + [tok.eos_token_id], True)
                for p in prefixes]

    monkeypatch.setattr(vineppo, "sample_continuations", fake)
    vineppo.assign_mc_advantages(None, tok, [episode], [{"problem": "", "answer": "4"}], args)
    assert set(rolled) == {tuple(prompt), tuple(prompt + ids[:starts[1]])}  # s_2 is never rolled out
    assert episode.step_values == [1.0, 0.0]  # V(s_0) = 1 ("#### 4"); V(s_1) = 0 (no answer)
    assert episode.token_advantages == ([-1.0] * starts[1] + [1.0] * (starts[2] - starts[1])
                                        + [0.0] * (len(ids) - starts[2]))


def test_capped_step_advantages_of_a_30_step_response_sum_to_the_return_minus_v0():
    """Official GSM8K cap: s_0 and 25 step states valued (26 values) of a 30-step response; R still reaches
    the gradient, and the advantages telescope to R - V(s_0) for either reward."""
    values = [0.5 + 0.01 * i for i in range(26)]
    for reward in (0.0, 1.0):
        advantages = vineppo.step_advantages(values, reward, n_steps=30)
        assert len(advantages) == 30 and advantages[26:] == [0.0] * 4
        assert advantages[25] == pytest.approx(reward - values[25])
        assert sum(advantages) == pytest.approx(reward - values[0])


def test_the_official_state_cap_is_26_on_gsm8k_and_none_on_math():
    for task, cap in [("gsm8k", 26), ("arith", 26), ("math", None)]:
        assert vineppo.state_cap(vineppo.parse_args(["--model", "m", "--task", task])) == cap
    assert vineppo.state_cap(vineppo.Args(task="gsm8k", max_states_per_response=0)) is None
    e = vineppo.Episode(0, [1], list(range(2, 42)), "", 1.0, False, step_starts=list(range(40)))
    assert len(vineppo.episode_states(e, None)) == 40 and len(vineppo.episode_states(e, 26)) == 26


def test_paper_iterations_by_task_and_critic_head_init():
    assert vineppo.parse_args(["--model", "m", "--task", "gsm8k"]).iterations == 650
    assert vineppo.parse_args(["--model", "m", "--task", "math"]).iterations == 1000
    tok = vineppo.build_tiny_tokenizer()
    critic = vineppo.ValueNetwork.from_policy(vineppo.build_tiny_model(tok, seed=0))
    hidden = critic.head.weight.shape[1]
    assert torch.all(critic.head.bias == 0)
    assert critic.head.weight.std().item() == pytest.approx((hidden + 1) ** -0.5, rel=0.25)  # official N(0, 1/sqrt(H+1))


def test_shared_prefill_draws_the_same_tokens(monkeypatch):
    """Identical prefixes share one prefill (the K rollouts of a state): the samples must be exactly those of
    plain `generate` with the same seed, with left padding in the batch and a state's copies split across
    two calls; and the shared cache really is used: it holds all but the last prompt token, and `generate`
    writes its new tokens into it (a cache with a row per distinct prompt, not per copy, makes `generate` raise)."""
    tok = vineppo.build_tiny_tokenizer()
    model = vineppo.build_tiny_model(tok, seed=0).eval()
    states = [tok.encode(vineppo.make_prompt(p), add_special_tokens=False) for p in ("1+2", "Start at 30: +4.", "7")]
    prefixes = [s for s in states for _ in range(3)] + [states[0] + [40, 41]]  # [10 rows], lengths differ
    kwargs = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0, top_p=0.9, batch_size=4,
                  progress=False)
    real, shapes = vineppo.shared_prefix_cache, []

    def spy(model, input_ids, attention_mask):
        cache = real(model, input_ids, attention_mask)
        shapes.append(None if cache is None else (cache, cache.get_seq_length(), input_ids.shape[1]))
        return cache

    monkeypatch.setattr(vineppo, "shared_prefix_cache", spy)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        shared = vineppo.sample_continuations(model, prefixes, [6] * len(prefixes), **kwargs)
        torch.manual_seed(0)
        plain = vineppo.sample_continuations(model, prefixes, [6] * len(prefixes), share_prefixes=False, **kwargs)
    assert shared == plain
    assert len({(tuple(p), tuple(ids)) for p, (ids, _) in zip(prefixes, shared)}) > len(states) + 1  # really sampled
    used = [s for s in shapes if s is not None]
    assert used and all(length == width - 1 < cache.get_seq_length() for cache, length, width in used)


def test_shared_prefix_cache_gives_generate_the_same_logits():
    """The shared cache holds what `generate`'s own prefill would (left-padded rows included), so the logits
    of every step agree up to float rounding (the last prompt token runs as a one-token step, not in the
    prefill); no cache when no row repeats another, or with one prompt token only."""
    from transformers import GenerationConfig
    tok = vineppo.build_tiny_tokenizer()
    model = vineppo.build_tiny_model(tok, seed=0).eval()
    ids = torch.tensor([[0, 0, 5, 6], [0, 0, 5, 6], [7, 8, 9, 10]])  # rows 0 and 1 repeat, left-padded
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    config = GenerationConfig(do_sample=False, max_new_tokens=3, pad_token_id=0, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        assert vineppo.shared_prefix_cache(model, ids[1:], mask[1:]) is None
        assert vineppo.shared_prefix_cache(model, ids[:2, -1:], mask[:2, -1:]) is None
        cache = vineppo.shared_prefix_cache(model, ids, mask)
        assert cache.get_seq_length() == 3  # its rows: 3, or `generate` below raises (a size mismatch)
        runs = [model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                               **{vineppo.CACHE_NAME: c}) for c in (cache, None)]
    for shared, plain in zip(runs[0].logits, runs[1].logits):  # [3 rows, vocab] per step
        torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)  # a wrong position or row: ~4e-3


def test_docstring_examples_hold():
    """The worked examples in vineppo.py's docstrings are part of the documentation: they must be true."""
    failures, tried = doctest.testmod(vineppo)[:2]
    assert tried >= 5 and failures == 0


# ============================================================================================
# 11. batching: collate and right_aligned
# ============================================================================================
def collate_episodes(episodes, pad_id):
    return vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_id)


def _episode(prompt, response):
    return vineppo.Episode(0, prompt, response, "", 0.0, False)


def test_collate_left_pads_and_right_aligns_responses():
    """Worked by hand: rows [9, 5,6,7 | 8,9] and [5,6 | 10,11,12,13] with pad 99."""
    batch = collate_episodes([_episode([5, 6, 7], [8, 9]), _episode([5, 6], [10, 11, 12, 13])], pad_id=99)
    assert batch["input_ids"].tolist() == [[99, 5, 6, 7, 8, 9], [5, 6, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["position_ids"][0, 1:].tolist() == [0, 1, 2, 3, 4]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5]


def test_collate_response_mask_marks_exactly_the_response_tokens():
    """For varied lengths: the last T columns hold each response right-aligned where response_mask is 1,
    and position ids count the real tokens from 0."""
    rng = random.Random(3)
    episodes = [_episode([rng.randint(3, 50) for _ in range(rng.randint(1, 6))],
                         [rng.randint(3, 50) for _ in range(rng.randint(1, 7))]) for _ in range(6)]
    batch = collate_episodes(episodes, pad_id=0)
    T = max(len(e.response_ids) for e in episodes)
    assert batch["response_mask"].shape == (6, T)
    for b, e in enumerate(episodes):
        mask = batch["response_mask"][b].bool()
        assert mask.tolist() == [False] * (T - len(e.response_ids)) + [True] * len(e.response_ids)
        assert batch["input_ids"][b, -T:][mask].tolist() == e.response_ids
        n = len(e.prompt_ids) + len(e.response_ids)
        assert batch["input_ids"][b, -n:].tolist() == e.prompt_ids + e.response_ids
        assert batch["attention_mask"][b].sum().item() == n
        assert batch["position_ids"][b, -n:].tolist() == list(range(n))


def test_right_aligned_matches_collate_layout():
    """right_aligned puts each row at the right end (empty rows stay 0) exactly where collate's mask is 1."""
    out = vineppo.right_aligned([[1.0, 2.0], [3.0, 4.0, 5.0, 6.0], []], 4)
    assert out.tolist() == [[0, 0, 1, 2], [3, 4, 5, 6], [0, 0, 0, 0]]
    episodes = [_episode([1], [2, 3]), _episode([1, 1, 1], [4]), _episode([1], [5, 6, 7])]
    batch = collate_episodes(episodes, pad_id=0)
    ones = vineppo.right_aligned([[1.0] * len(e.response_ids) for e in episodes], batch["response_mask"].shape[1])
    assert torch.equal(ones, batch["response_mask"])


# ============================================================================================
# 12. response_logprobs on a tiny model
# ============================================================================================
@pytest.fixture(scope="module")
def tiny():
    tok = vineppo.build_tiny_tokenizer()
    with torch.random.fork_rng():  # build_tiny_model seeds torch; keep the global RNG untouched
        model = vineppo.build_tiny_model(tok, seed=0).eval()
    return tok, model


def _char_episode(tok, prompt_text, response_text):
    return _episode(tok.encode(prompt_text, add_special_tokens=False),
                    tok.encode(response_text, add_special_tokens=False) + [tok.eos_token_id])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_match_manual_log_softmax(tiny, temperature):
    """On one unpadded sequence: log_softmax(logits / T) at each response token, gathered by hand."""
    tok, model = tiny
    e = _char_episode(tok, vineppo.make_prompt("Start at 3: +4."), "\n3+4=7\n#### 7")
    batch = collate_episodes([e], tok.pad_token_id)
    with torch.no_grad():
        got = vineppo.response_logprobs(model, batch, temperature)
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logits = model(input_ids=ids).logits[0].double()  # [L, vocab]
    P = len(e.prompt_ids)
    manual = [torch.log_softmax(logits[P - 1 + j] / temperature, -1)[tok_id].item() for j, tok_id in enumerate(e.response_ids)]
    assert got.shape == (1, len(e.response_ids))
    assert got[0].tolist() == pytest.approx(manual, abs=1e-5)


def test_response_logprobs_left_padding_changes_nothing(tiny):
    """A row's log-probs alone equal its log-probs batched (left-padded) with a longer sequence."""
    tok, model = tiny
    short = _char_episode(tok, vineppo.make_prompt("Start at 2: +1."), "\n2+1=3\n#### 3")
    long = _char_episode(tok, vineppo.make_prompt("Start at 9: *8, -5, +7."), "\n9*8=72\n72-5=67\n67+7=74\n#### 74")
    with torch.no_grad():
        alone = vineppo.response_logprobs(model, collate_episodes([short], tok.pad_token_id), 0.6)
        both = vineppo.response_logprobs(model, collate_episodes([short, long], tok.pad_token_id), 0.6)
        long_alone = vineppo.response_logprobs(model, collate_episodes([long], tok.pad_token_id), 0.6)
    n = len(short.response_ids)
    assert both.shape == (2, len(long.response_ids))
    assert torch.allclose(both[0, -n:], alone[0], atol=1e-5)
    assert both[0, :-n].abs().sum().item() == 0.0  # padding columns are masked to 0
    assert torch.allclose(both[1], long_alone[0], atol=1e-5)


def test_ppo_ratio_is_one_before_any_update(tiny):
    """logp_old and logp from the same model at T=0.6 give ratio 1 on every response token (first minibatch)."""
    tok, model = tiny
    episodes = [_char_episode(tok, vineppo.make_prompt("Start at 2: +1."), "\n2+1=3\n#### 3"),
                _char_episode(tok, vineppo.make_prompt("Start at 9: *8."), "\n9*8=72\n#### 72")]
    batch = collate_episodes(episodes, tok.pad_token_id)
    with torch.no_grad():
        logp_old = vineppo.response_logprobs(model, batch, 0.6)
    logp = vineppo.response_logprobs(model, batch, 0.6)
    mask = batch["response_mask"]
    ratio = torch.exp(logp - logp_old)[mask.bool()]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    losses, stats = vineppo.ppo_policy_loss(logp, logp_old, torch.ones_like(mask), mask, 0.2)
    assert stats["clipped"] == 0 and stats["ratio_sum"] == pytest.approx(mask.sum().item(), abs=1e-4)


def test_response_logprobs_equal_the_sampling_distribution_of_generate(tiny):
    """Recomputed log-probs at T=0.6 equal the log-probs of the distribution `generate` sampled from
    (temperature 0.6, no top-k/top-p cut), so pi_old is the sampling policy."""
    tok, model = tiny
    prompt = tok.encode(vineppo.make_prompt("Start at 3: +4."), add_special_tokens=False)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=True, temperature=0.6, top_k=0, top_p=1.0, max_new_tokens=12,
                             output_scores=True, return_dict_in_generate=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    response = out.sequences[0, len(prompt):].tolist()
    if tok.eos_token_id in response:
        response = response[:response.index(tok.eos_token_id) + 1]
    sampled = [torch.log_softmax(out.scores[j][0].double(), -1)[t].item() for j, t in enumerate(response)]
    with torch.no_grad():
        got = vineppo.response_logprobs(model, collate_episodes([_episode(prompt, response)], tok.pad_token_id), 0.6)
    assert got[0].tolist() == pytest.approx(sampled, abs=1e-4)


# ============================================================================================
# 14. the built-in arithmetic task
# ============================================================================================
LINE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def test_make_arith_task_deterministic_and_disjoint():
    """Same seed -> same sets; another seed -> different; train and test never share a problem."""
    train, test = vineppo.make_arith_task(0, 4000, 500, 0.4)  # the default sizes: raw draws repeat at this scale
    vineppo.arith_chains.cache_clear()  # drawn again, not read from the cache
    assert (train, test) == vineppo.make_arith_task(0, 4000, 500, 0.4)
    test[0]["problem"] = "changed"  # the caller's copy: the cache is not touched
    assert vineppo.make_arith_task(0, 4000, 500, 0.4)[1][0]["problem"] != "changed"
    train, test = vineppo.make_arith_task(0, 4000, 500, 0.4)
    assert vineppo.make_arith_task(1, 4000, 500, 0.4) != (train, test)
    assert len(train) == 4000 and len(test) == 500
    train_problems, test_problems = {p["problem"] for p in train}, {p["problem"] for p in test}
    assert len(train_problems) == 4000 and len(test_problems) == 500  # no duplicates either
    assert not train_problems & test_problems
    # the slip rate and kinds change only the written training solutions, never which problems are drawn
    for rate, kinds in [(0.0, "mul,carry,borrow"), (0.4, "carry")]:
        other_train, other_test = vineppo.make_arith_task(0, 4000, 500, rate, slip_kinds=kinds)
        assert [p["problem"] for p in other_train] == [p["problem"] for p in train] and other_test == test


def test_slips_by_hand():
    """Each kind of slip the tutor makes, and which steps invite one (on the value written so far)."""
    slip, kind = vineppo.slipped_result, vineppo.slip_kind
    assert [slip(7, "*", 2), slip(8, "+", 5), slip(18, "+", 5), slip(13, "-", 5), slip(23, "-", 7), slip(40, "-", 1)] \
        == [9, 3, 13, 12, 24, 41]
    assert [kind(7, "*", 2), kind(18, "+", 2), kind(18, "+", 1), kind(10, "-", 1), kind(19, "-", 9), kind(9, "-", 5)] \
        == ["mul", "carry", None, "borrow", None, None]
    assert vineppo.solve_chain(18, [("+", 5), ("-", 5), ("*", 2)], lambda k: True) == ("18+5=13\n13-5=12\n12*2=14\n#### 14", 14)
    assert vineppo.solve_chain(18, [("+", 5), ("-", 5), ("*", 2)], lambda k: k == "borrow")[1] == 44  # 23-5=22
    assert vineppo.solve_chain(18, [("+", 5), ("-", 5), ("*", 2)], lambda k: k == "mul")[1] == 20


def check_chain(item, allow_slips: bool, lengths=(4, 6)) -> list[tuple[str | None, bool]]:
    """Walk a solution line by line against its problem; return (kind the step invites, slipped?) per step."""
    *lines, last = item["solution"].split("\n")
    start = int(re.match(r"Start at (\d+):", item["problem"]).group(1))
    ops = re.findall(r"([+\-*])(\d+)", item["problem"].split(":", 1)[1])
    assert lengths[0] <= len(lines) == len(ops) <= lengths[1]
    value, steps = start, []
    for line, (sign, operand) in zip(lines, ops):
        a, op, b, c = LINE.match(line).groups()
        assert (int(a), op, b) == (value, sign, operand)  # each line continues from the line before
        right = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        kind = vineppo.slip_kind(int(a), op, int(b))
        slipped = int(c) != right
        if slipped:
            assert allow_slips, f"a slip in a solution that must be right: {line}"
            assert kind and int(c) == vineppo.slipped_result(int(a), op, int(b)), line  # only the tutor's slips
        steps.append((kind, slipped))
        value = int(c)
    assert last == f"#### {value}"
    if not any(slipped for _, slipped in steps):
        assert str(value) == item["answer"]
    target = vineppo.make_sft_target(item["solution"])
    assert vineppo.grade_gsm8k(target, item["answer"]) == float(str(value) == item["answer"])
    assert len(vineppo.split_steps(target)) == len(lines)  # one step per operation, answer merged
    return steps


def test_make_arith_task_solutions_are_gsm8k_shaped_and_chained():
    """Every solution: lines 'a op b = c' chained from the problem, then '#### answer'. Test solutions
    are all right; training solutions are right except the tutor's slips, which happen at about the
    asked rate at each kind of step that invites one, and never with slip_rate 0."""
    train, test = vineppo.make_arith_task(0, 4000, 500, 0.4)
    assert all(not any(s for _, s in check_chain(item, allow_slips=False)) for item in test)
    steps = [step for item in train for step in check_chain(item, allow_slips=True)]
    for kind in vineppo.SLIP_KINDS:
        invited = [slipped for k, slipped in steps if k == kind]
        assert len(invited) > 2000 and 0.37 < sum(invited) / len(invited) < 0.43, kind
    assert not any(slipped for k, slipped in steps if k is None)
    wrong = [item for item in train if vineppo.grade_gsm8k(item["solution"], item["answer"]) == 0]
    assert 0.6 < len(wrong) / len(train) < 0.85  # most slips lead to a wrong final answer
    clean, _ = vineppo.make_arith_task(0, 4000, 500, 0.0)
    assert all(not any(s for _, s in check_chain(item, allow_slips=False)) for item in clean)
    assert all(1 <= int(n) <= 50 for item in test for n in re.findall(r"\d+", item["solution"]))


def test_arith_task_knobs_chain_length_and_slip_kinds():
    """--chain-length sets the number of operations; --slip-kinds limits the tutor to those kinds."""
    train, test = vineppo.make_arith_task(0, 300, 40, 0.5, chain_length="10-12", slip_kinds="carry")
    steps = [step for item in train for step in check_chain(item, allow_slips=True, lengths=(10, 12))]
    assert {k for k, slipped in steps if slipped} == {"carry"}
    assert {len(item["ops"]) for item in train + test} == {10, 11, 12}
    exact, _ = vineppo.make_arith_task(0, 50, 5, 0.4, chain_length="3", slip_kinds="")
    assert all(len(item["ops"]) == 3 and item["solution"] == vineppo.solve_chain(item["start"], item["ops"])[0]
               for item in exact)


# Every form of `--step-forms` read back as (a, sign, b, c, form)
FORM_LINES = [re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$"), re.compile(r"^(-?\d+) ([+\-*]) (\d+) = (-?\d+)$"),
              re.compile(r"^(?P<c>-?\d+)=(?P<a>-?\d+)(?P<s>[+\-*])(?P<b>\d+)$"),
              re.compile(r"^(-?\d+) (plus|minus|times) (\d+) is (-?\d+)$")]  # a slip carried on can go below 0


def read_step(line: str) -> tuple:
    for form, pattern in enumerate(FORM_LINES):
        if m := pattern.match(line):
            a, sign, b, c = (m["a"], m["s"], m["b"], m["c"]) if form == 2 else m.groups()
            return int(a), {"plus": "+", "minus": "-", "times": "*"}.get(sign, sign), int(b), int(c), form
    raise AssertionError(f"no form matches {line!r}")


def test_step_forms_write_the_same_steps_in_other_words():
    """--step-forms 4: the problems, slips and answers of the task's own form, each training step written in
    one of the four forms, drawn per step (about a quarter each); every solution grades as the plain one (1 if
    right, 0 if wrong, both seen) and splits into one step per line. With 1, the task is bit for bit the one
    before the option existed (the demo's)."""
    plain, test = vineppo.make_arith_task(0, 4000, 500, 0.3)
    assert hashlib.sha256(json.dumps([plain, test], sort_keys=True).encode()).hexdigest() == \
        "9d1049e362040bde26eb64e4a480e87ed84745c36a8ee7b276f97dd354a04437"  # measured on the code before the option
    forms, forms_test = vineppo.make_arith_task(0, 4000, 500, 0.3, step_forms=4)
    assert forms_test == test
    counts, grades = [0] * 4, set()
    for a, b in zip(plain, forms):
        assert {k: v for k, v in a.items() if k != "solution"} == {k: v for k, v in b.items() if k != "solution"}
        *lines_a, last_a = a["solution"].split("\n")
        *lines_b, last_b = b["solution"].split("\n")
        assert last_a == last_b and len(lines_a) == len(lines_b)
        for x, y in zip(lines_a, lines_b):
            assert read_step(x)[4] == 0 and read_step(x)[:4] == read_step(y)[:4]  # the same step, slip and all
            counts[read_step(y)[4]] += 1
        target = vineppo.make_sft_target(b["solution"])
        grade = vineppo.grade_gsm8k(target, b["answer"])
        assert grade == vineppo.grade_gsm8k(vineppo.make_sft_target(a["solution"]), a["answer"])
        steps = vineppo.split_response("arith", target)  # one step per line, the answer merged into the last
        assert "".join(steps) == target and [step.split("\n")[1] for step in steps] == lines_b
        grades.add(grade)
    assert grades == {0.0, 1.0}
    assert all(0.23 < n / sum(counts) < 0.27 for n in counts), counts
    assert vineppo.make_arith_task(0, 50, 5, 0.3, step_forms=2)[0] != vineppo.make_arith_task(0, 50, 5, 0.3)[0]
    assert {read_step(line)[4] for p in vineppo.make_arith_task(0, 300, 5, 0.3, step_forms=2)[0]
            for line in p["solution"].split("\n")[:-1]} == {0, 1}


def test_sft_loss_is_the_token_mean_per_sequence_then_the_batch_mean():
    """Official SFT loss: each sequence's token mean, then the mean over the batch (a short solution counts as
    much as a long one). With lr 0 the single step returns the loss of the untouched model."""
    tok = vineppo.build_tiny_tokenizer()
    model = vineppo.build_tiny_model(tok, seed=0)
    problems = [{"problem": "1+1", "solution": "2"}, {"problem": "2+2", "solution": "4\n4\n4\n4\n4\n4\n4\n4"}]
    args = vineppo.Args(sft_epochs=1, sft_batch_size=2, sft_lr=0.0, micro_batch_size=1)
    loss = vineppo.supervised_finetune(model, tok, problems, args, torch.device("cpu"))
    per_sequence = []
    for p in problems:
        target = tok(vineppo.make_sft_target(p["solution"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        batch = vineppo.collate([vineppo.encode_prompt(tok, p["problem"])], [target], tok.pad_token_id)
        with torch.no_grad():
            per_sequence.append(-vineppo.response_logprobs(model, batch, 1.0).mean().item())
    assert loss == pytest.approx(sum(per_sequence) / 2, rel=1e-5)
    token_mean = (per_sequence[0] * 4 + per_sequence[1] * 18) / 22  # what a token mean over the batch would give
    assert abs(loss - token_mean) > 1e-3


def test_explained_variance_hand_made():
    mask = torch.ones(1, 4)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert vineppo.explained_variance(target, target, mask) == pytest.approx(1.0)
    assert vineppo.explained_variance(torch.full((1, 4), 0.5), target, mask) == pytest.approx(0.0)
    assert vineppo.explained_variance(torch.rand(1, 4), torch.zeros(1, 4), mask) == 0.0  # nothing to explain


def test_mc_explained_variance_compares_each_tokens_step_value_with_the_return(monkeypatch):
    """A (R = 1): steps at tokens 0 and 2, V = 0.5 and 1.0; B (R = 0): one step, V = 0.5; C (R = 1): steps at
    tokens 0 and 1, only s_0 valued (0.5: the state cap), so its second token is left out (V = R there would
    count as explained). Valued tokens: V [.5 .5 1 1 | .5 .5 | .5], R [1 1 1 1 | 0 0 | 1]: Var(R - V) = 8.5/49,
    Var(R) = 10/49, explained variance 1 - 0.85 = 0.15 (0.1875 if C's capped token counted)."""
    a = vineppo.Episode(0, [1], [5, 6, 7, 8], "", 1.0, False, step_starts=[0, 2])
    b = vineppo.Episode(1, [1], [5, 6], "", 0.0, False, step_starts=[0])
    c = vineppo.Episode(2, [1], [5, 6], "", 1.0, False, step_starts=[0, 1])

    def fake_mc(model, tokenizer, episodes, problems, args):
        a.step_values, b.step_values, c.step_values = [0.5, 1.0], [0.5], [0.5]
        for e in episodes:
            e.token_advantages = [0.0] * len(e.response_ids)
        return {}
    monkeypatch.setattr(vineppo, "assign_mc_advantages", fake_mc)
    episodes = [a, b, c]
    batch = vineppo.collate([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_id=0)
    _, _, stats = vineppo.assign_credit(episodes, batch, {}, None, None, [], vineppo.Args(critic="mc"))
    assert stats["mc/explained_variance"] == pytest.approx(0.15)


# ============================================================================================
# 15. wiring that a swapped argument would break silently
# ============================================================================================
def test_precompute_takes_logp_old_from_the_policy_and_logp_ref_from_the_reference(tiny):
    """pi_old's log-probs come from the policy, the KL reference's from the frozen reference: two different
    models here, so taking either from the other model fails."""
    tok, policy = tiny
    with torch.random.fork_rng():
        reference = vineppo.build_tiny_model(tok, seed=1).eval()
    episodes = [_char_episode(tok, vineppo.make_prompt("Start at 2: +1."), "\n2+1=3\n#### 3"),
                _char_episode(tok, vineppo.make_prompt("Start at 9: *8."), "\n9*8=72\n#### 72")]
    batch = collate_episodes(episodes, tok.pad_token_id)
    args = vineppo.Args(temperature=0.6, micro_batch_size=1)  # one row per micro-batch: the slicing counts too
    fixed = vineppo.precompute(policy, reference, None, batch, args, torch.device("cpu"))
    with torch.no_grad():
        from_policy = vineppo.response_logprobs(policy, batch, 0.6)
        from_reference = vineppo.response_logprobs(reference, batch, 0.6)
    assert (from_policy - from_reference).abs().max() > 1e-3  # the two models really differ
    assert torch.allclose(fixed["logp_old"], from_policy, atol=1e-6)
    assert torch.allclose(fixed["logp_ref"], from_reference, atol=1e-6)
    assert not fixed["values_old"].any()  # no critic: no values


def test_evaluate_samples_at_the_eval_temperature(monkeypatch):
    """pass@1 is measured at --eval-temperature (paper: 0.35), not at the training --temperature; and it is the
    mean reward of eval_samples samples per problem."""
    tok = vineppo.build_tiny_tokenizer()
    seen = {}

    def fake_sample(model, prefixes, budgets, **kwargs):
        seen.update(kwargs, n=len(prefixes), budgets=set(budgets))
        answers = ["\n#### 3", "\n#### 4", "\n#### 5", "\n#### 5"]  # right, wrong | right, right
        return [(tok.encode(a, add_special_tokens=False) + [tok.eos_token_id], True) for a in answers]
    monkeypatch.setattr(vineppo, "sample_continuations", fake_sample)
    args = vineppo.Args(task="arith", temperature=0.9, eval_temperature=0.35, eval_samples=2, max_new_tokens=30)
    problems = [{"problem": "Start at 1: +2.", "answer": "3"}, {"problem": "Start at 2: +3.", "answer": "5"}]
    assert vineppo.evaluate(None, tok, problems, args) == pytest.approx(0.75)
    assert seen["temperature"] == 0.35 and seen["n"] == 4 and seen["budgets"] == {30}


def test_assign_credit_value_passes_gamma_and_lambda_to_gae_each_in_its_place():
    """With gamma = 0.5 and lambda = 0.8 (not the paper's 1, 1), GAE over three tokens, worked by hand:
    rewards [0, 0, 1], V [0.5, 0.25, 0.75]
    delta_2 = 1 - 0.75 = 0.25                   A_2 = 0.25
    delta_1 = 0.5 * 0.75 - 0.25 = 0.125         A_1 = 0.125 + 0.5 * 0.8 * 0.25 = 0.225
    delta_0 = 0.5 * 0.25 - 0.5 = -0.375         A_0 = -0.375 + 0.5 * 0.8 * 0.225 = -0.285
    (swapped, gamma 0.8 and lambda 0.5, A_1 would be 0.45)."""
    e = vineppo.Episode(0, [7, 8], [4, 5, 6], "", 1.0, False, steps=["x"], step_starts=[0])
    batch = collate_episodes([e], pad_id=0)
    fixed = {"values_old": torch.tensor([[0.5, 0.25, 0.75]])}
    args = vineppo.Args(critic="value", gamma=0.5, gae_lambda=0.8)
    advantages, returns, _ = vineppo.assign_credit([e], batch, fixed, None, None, [], args)
    assert advantages[0].tolist() == pytest.approx([-0.285, 0.225, 0.25])
    assert returns[0].tolist() == pytest.approx([-0.285 + 0.5, 0.225 + 0.25, 0.25 + 0.75])


def test_the_update_clips_the_value_loss_around_the_values_the_batch_was_sampled_with():
    """minibatch_backward clips the critic's loss around V_old, the values fixed before the update (PPO's value
    clipping), never around the values being trained. On hand-made inputs with V_old = V - 0.5 and returns
    V + 1 on every token, clip(V, V_old +- 0.2) = V - 0.3 and the clipped term wins: 0.5 * 1.3^2 = 0.845 per
    token, with a zero gradient (clipped around V itself: 0.5 * 1^2 = 0.5, with a gradient)."""
    tok = vineppo.build_tiny_tokenizer()
    with torch.random.fork_rng():  # the models and the critic's head are seeded, the global stream untouched
        policy = vineppo.build_tiny_model(tok, seed=0).eval()
        torch.manual_seed(0)
        critic = vineppo.ValueNetwork.from_policy(policy).eval()
    episodes = [_char_episode(tok, vineppo.make_prompt("Start at 2: +1."), "\n2+1=3\n#### 3"),
                _char_episode(tok, vineppo.make_prompt("Start at 9: *8, -5."), "\n9*8=72\n72-5=67\n#### 67")]
    batch = collate_episodes(episodes, tok.pad_token_id)
    mask = batch["response_mask"]  # [2, T]
    with torch.no_grad():
        values = vineppo.response_values(critic, batch)  # [2, T], V of the critic as it is now
        logp = vineppo.response_logprobs(policy, batch, 0.6)
    fixed = {"logp_old": logp, "logp_ref": logp, "values_old": (values - 0.5) * mask}
    args = vineppo.Args(critic="value", temperature=0.6, micro_batch_size=1, value_clip_range=0.2)
    sums = vineppo.minibatch_backward(policy, critic, batch, fixed, torch.zeros_like(mask), (values + 1.0) * mask,
                                      torch.arange(2), args, torch.device("cpu"))
    assert sums["value_loss"] == pytest.approx(0.845, abs=1e-4)  # 0.5 if clipped around V
    assert all(p.grad is None or not p.grad.any() for p in critic.parameters())
