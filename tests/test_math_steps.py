"""MATH step splitting (`split_math_steps`), clause by clause against the official rule (official code:
tasks/math_extract_steps_inplace.py), then properties over many hand-written solutions."""

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vineppo  # noqa: E402

split = vineppo.split_math_steps


# ============================================================================================
# 1. One clause per test
# ============================================================================================
def test_newlines_inside_align_are_boundaries():
    text = ("We factor: \\begin{align*}\nx^2 - 5x + 6 &= 0 \\\\\n(x - 2)(x - 3) &= 0\n\\end{align*}\n"
            "So the roots are $2$ and $3$.")
    assert split(text) == ["We factor: \\begin{align*}", "\nx^2 - 5x + 6 &= 0 \\\\", "\n(x - 2)(x - 3) &= 0",
                           "\n\\end{align*}", "\nSo the roots are $2$ and $3$."]


def test_a_lone_math_opening_joins_the_next_line():
    # "\n\\]" and "\n$$" hold only a delimiter: they join the line after them (the official code cannot tell
    # an opening from a closing one). The short "\nx = 1" stays: the 20-character rule ran before this cut.
    assert split("We have\n\\[\nx = 1\n\\]\nand the rest follows from this.") == [
        "We have\n\\[", "\nx = 1", "\n\\]\nand the rest follows from this."]
    assert split("First, note that\n$$\n\\frac{a}{b} = \\frac{3}{4}.\n$$\nHence $4a = 3b$, as we wanted.") == [
        "First, note that\n$$", "\n\\frac{a}{b} = \\frac{3}{4}.", "\n$$\nHence $4a = 3b$, as we wanted."]


def test_sentence_end_after_math():
    assert split("Let the side be $s = 7$. Then the perimeter is $4s = 28$.") == [
        "Let the side be $s = 7$.", " Then the perimeter is $4s = 28$."]
    assert len(split("Let the side be $s = 7$. then the perimeter is $4s = 28$.")) == 1  # no capital letter


def test_math_that_ends_with_its_own_period_ends_a_step():
    # cut after the math even without a capital letter; a period inside math never ends a sentence
    assert split("We know that $s = 7.$ so the perimeter is $4s = 28$.") == [
        "We know that $s = 7.$", " so the perimeter is $4s = 28$."]
    assert len(split("We know that $s = 7. Then$ the perimeter is $4s = 28$.")) == 1


def test_no_sentence_end_after_a_one_or_two_letter_word():
    assert split("Pick a small prime, e.g. Three is fine here. Then check that it divides $12$.") == [
        "Pick a small prime, e.g. Three is fine here.", " Then check that it divides $12$."]
    assert len(split("We need an even number here, and it is so. Then we check that it divides $12$.")) == 1


def test_short_piece_ending_with_math_period_is_kept():
    assert split("So $x = 2.$\nThe rest of the solution follows from this.") == [
        "So $x = 2.$", "\nThe rest of the solution follows from this."]


def test_short_piece_ending_with_a_plain_period_waits_one_pass():
    # Officially, the first pass keeps a short piece that ends with '.', so "\n\nHence" joins the piece AFTER
    # it; the second pass merges every short piece unless it ends with math like "$x = 2.$".
    assert len(split("So x is two.\nThe rest of the solution follows from this.")) == 1
    assert split("Thus it is one.\n\nHence\n\nNote that $a = b$ holds here.") == [
        "Thus it is one.\n\nHence\n\nNote that $a = b$ holds here."]  # one pass would give 2 steps


def test_short_pieces_merge_otherwise():
    assert len(split("Hence\nthe value of $x$ is two, as we computed.")) == 1  # into the next piece
    assert len(split("The value of $x$ is two, as computed.\nDone")) == 1  # the last one into the one before
    assert split("Ok.") == ["Ok."] and split("") == [""]  # a single piece stays, however short


@pytest.mark.parametrize("separator", [",", " and", ":", " to"])
def test_prose_break_needs_40_characters_each_side(separator):
    first = "a" * (40 - len(separator)) + separator
    assert split(first + " " + "b" * 70) == [first, " " + "b" * 70]  # the cut falls before the space
    too_short = first[1:]  # 39 characters: no cut
    assert split(too_short + " " + "b" * 70) == [too_short + " " + "b" * 70]


@pytest.mark.parametrize("sign", ["=", "+", "\\equiv", ",$"])
def test_math_break_needs_20_characters_each_side(sign):
    second = (" $" if sign == ",$" else " ") + "b" * 80 + "$"
    first = "$" + "a" * (19 - len(sign)) + sign
    assert split(first + second) == [first, second]
    too_short = "$" + first[2:]  # 19 characters: no cut
    assert split(too_short + second) == [too_short + second]


def test_prose_cuts_come_before_math_cuts_and_patterns_in_order():
    prose = "We add the first twenty terms of the sum, $" + " + ".join(["a"] * 20) + " = 210$"
    assert split(prose) == ["We add the first twenty terms of the sum,", prose[41:]]  # the ',' wins over '+'
    math = "$" + "a" * 30 + " = " + "b" * 30 + ",$ $" + "c" * 60 + "$"
    assert split(math)[0] == "$" + "a" * 30 + " = " + "b" * 30 + ",$"  # ',$' is tried before '='


def test_very_long_piece_is_halved_recursively():
    text = ", ".join(f"then term number {i} is added" for i in range(20)) + "."
    steps = split(text)
    assert "".join(steps) == text and len(steps) >= 8
    assert all(40 <= len(step) <= 100 for step in steps), [len(step) for step in steps]


# ============================================================================================
# 2. Hand-written solutions: properties over all of them, and a few checked by hand
# ============================================================================================
MATH_SOLUTIONS = [
    "We have $x = 2$. Then $y = x + 1 = 3$.\nSo the answer is $\\boxed{3}$.",
    "Let the side be $s$. The area is $s^2 = 49$, so $s = 7$. The perimeter is $4s = \\boxed{28}$.",
    "First, note that\n$$\n\\frac{a}{b} = \\frac{3}{4}.\n$$\nHence $4a = 3b$. Since $a + b = 14$, we get $a = 6$ and $b = 8$.\n"
    "The answer is $\\boxed{6}$.",
    "By Vieta's formulas, the sum of the roots is $-\\frac{b}{a} = 5$ and the product is $\\frac{c}{a} = 6$. "
    "Therefore the roots are $2$ and $3$, and their sum of squares is $4 + 9 = \\boxed{13}$.",
    "We compute \\[\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix} \\begin{pmatrix} 1 \\\\ 1 \\end{pmatrix} = "
    "\\begin{pmatrix} 3 \\\\ 7 \\end{pmatrix}.\\] The answer is $\\boxed{\\begin{pmatrix} 3 \\\\ 7 \\end{pmatrix}}$.",
    "There are $\\binom{5}{2} = 10$ ways to choose two. Of these, $4$ contain the red ball. So the probability "
    "is $\\frac{4}{10} = \\boxed{\\frac{2}{5}}$.",
    "\n\nThe shirt costs \\$20, and the pants cost \\$30. Together, they cost \\$50, which is the answer, $\\boxed{50}$.",
    "Since the triangle is right, by Pythagoras, the hypotenuse is $\\sqrt{3^2 + 4^2} = 5$, and its area, "
    "half the product of the legs, is $6$, so the inradius, area over semiperimeter, is $\\boxed{1}$.",
    "We factor: \\begin{align*}\nx^2 - 5x + 6 &= 0 \\\\\n(x - 2)(x - 3) &= 0.\n\\end{align*}\nThe solutions are "
    "$x = 2$ and $x = 3$. Their product is $\\boxed{6}$.",
    "Ok.",
    "Let $f(x) = 3x + 2$. Then \\(f(4) = 14\\). Also \\(f(f(1)) = f(5) = 17\\). Thus the sum is $14 + 17 = \\boxed{31}$.\n",
    "The long formula here is $a_1 + a_2 + a_3 + a_4 + a_5 + a_6 + a_7 + a_8 + a_9 + a_{10} + a_{11} + a_{12} = "
    "78$, so, since each term is one more than the last, and the first is one, the average, being the middle, "
    "is $6.5$, and the answer is $\\boxed{6.5}$.",
]
SENTENCES = ["Note that $a = b$.", "Then $x^2 = 4$, so $x = 2$.", "We get $$y = \\frac{1}{2}\n+ 3$$ here.",
             "Thus \\(z = 1\\).", "Hence", "A.", "This, in turn, gives, after a short check, a clean value, and so on, "
             "which, again, we write down, carefully, for later, use.", "\\[\n\\sum_{k=1}^n k = \\frac{n(n+1)}{2}\n\\]",
             "So $\\boxed{5}$."]


def random_solution(rng: random.Random) -> str:
    return "".join(rng.choice(SENTENCES) + rng.choice([" ", "\n", "\n\n", ". ", " "]) for _ in range(rng.randint(1, 12)))


ALL_SOLUTIONS = MATH_SOLUTIONS + [random_solution(random.Random(i)) for i in range(200)]
MATH_CUT = re.compile(r",\$|,\\\)|,\\\]|=|\\equiv|\+|\\cancelto")


@pytest.mark.parametrize("text", ALL_SOLUTIONS)
def test_split_math_steps_properties(text):
    steps = split(text)
    assert "".join(steps) == text and all(steps)  # re-join exactly; no empty step
    cuts = [len("".join(steps[:i])) for i in range(1, len(steps))]
    for cut in cuts:
        assert not (text[cut - 1].isalnum() and text[cut].isalnum()), (cut, steps)  # never inside a word
        inside = [m for m in vineppo.MATH_REGION.finditer(text) if m.start() < cut < m.end()]
        assert not inside or text[cut] == "\n" or MATH_CUT.search(text[max(0, cut - 9):cut]), (cut, steps)
    for i, step in enumerate(steps):
        if len(step) > 100:  # too long, because no cut of it leaves 20 characters on each side
            assert not [m for m in MATH_CUT.finditer(step) if 20 <= m.end() <= len(step) - 20], step
        if len(steps) > 1 and len(step) < 20:  # too short: ends with "$x = 2.$", or a line of multi-line math
            next_step = steps[i + 1] if i + 1 < len(steps) else ""
            assert step.endswith(vineppo.MATH_PERIOD) or step.startswith("\n") or next_step.startswith("\n"), steps


def test_split_math_steps_hand_checked():
    """Each expectation was also produced by the official code's splitter."""
    # "We have $x = 2$." and "\nHence $4a = 3b$." are under 20 characters: they join the next sentence
    assert split(MATH_SOLUTIONS[0]) == ["We have $x = 2$. Then $y = x + 1 = 3$.", "\nSo the answer is $\\boxed{3}$."]
    assert split(MATH_SOLUTIONS[2]) == [
        "First, note that\n$$", "\n\\frac{a}{b} = \\frac{3}{4}.",
        "\n$$\nHence $4a = 3b$. Since $a + b = 14$, we get $a = 6$ and $b = 8$.", "\nThe answer is $\\boxed{6}$."]
    # The prose middle counts "$\sqrt{3^2 + 4^2} = 5$" as 60 characters: the first cut is the comma after it.
    assert split(MATH_SOLUTIONS[7]) == [
        "Since the triangle is right, by Pythagoras, the hypotenuse is $\\sqrt{3^2 + 4^2} = 5$,",
        " and its area, half the product of the legs,", " is $6$, so the inradius, area over semiperimeter, is $\\boxed{1}$."]
    assert split(MATH_SOLUTIONS[11]) == [  # a '+' inside math, then commas
        "The long formula here is $a_1 + a_2 + a_3 + a_4 + a_5 +", " a_6 + a_7 + a_8 + a_9 + a_{10} + a_{11} + a_{12} = 78$,",
        " so, since each term is one more than the last, and the first is one, the average,",
        " being the middle, is $6.5$, and the answer is $\\boxed{6.5}$."]
    assert vineppo.split_response("math", MATH_SOLUTIONS[0]) == split(MATH_SOLUTIONS[0])
    assert vineppo.split_response("gsm8k", "a\nb") == ["a", "\nb"]
