"""Pulling the answer out of a completion: the shared extraction rules of all rewards.

One rule everywhere: the answer is the content of the LAST <answer>...</answer> block (it may
span lines), stripped; a completion without such a block is taken whole, stripped. The gold
column goes through the same rule, so a dataset may store "3" or "<answer> 3 </answer>".
"""

from __future__ import annotations

import re
from decimal import Decimal

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = "\\boxed"

# A number as written in running text. Digits with optional thousands commas and decimals;
# a sign only where a sign can stand (start, after a space or an opening bracket), so that
# "3-4" reads as 3 and 4 and "2023-01-05" as 2023, 1, 5; never starts inside another number.
_NUMBER = re.compile(
    r"""
    (?: (?: ^ | (?<=[\s(\[{:=：]) ) [-+−] )?   # sign, only where a sign can stand
    (?<![\d.])                                # not inside another number
    (?: \d{1,3} (?: ,\d{3} )+ | \d+ )          # 1,200 or 1200
    (?: \.\d+ )?                               # decimals
    (?!\d)
    """,
    re.VERBOSE,
)


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer> block, stripped; None when there is none."""
    matches = _ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def answer_or_text(text: str) -> str:
    """The answer block's content if present, else the whole text; stripped either way."""
    answer = extract_answer(text)
    return answer if answer is not None else text.strip()


def extract_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...}, braces balanced (\boxed{\frac{1}{2}} -> \frac{1}{2}).

    None when there is no \boxed{ or its braces never close (a truncated completion).
    """
    start = text.rfind(_BOXED + "{")
    while start != -1:
        content = _balanced_content(text, start + len(_BOXED))
        if content is not None:
            return content.strip()
        start = text.rfind(_BOXED + "{", 0, start)  # unclosed: try an earlier one
    return None


# What may follow a box that is the last thing said: "$\boxed{12}$." or "\[ \boxed{12} \]".
_AFTER_FINAL_BOX = " \t\r\n$.)]\\"


def trailing_boxed(text: str) -> str | None:
    r"""Content of a \boxed{...} that ends the text, stripped; None when the text ends otherwise.

    Only spaces, $, periods, closing brackets and backslashes may follow the box.
    """
    body = text.rstrip(_AFTER_FINAL_BOX)
    start = body.rfind(_BOXED + "{")
    while start != -1:  # an inner box of \boxed{\boxed{5}} does not end the text; the outer does
        content = _balanced_content(body, start + len(_BOXED))
        if content is not None and start + len(_BOXED) + len(content) + 2 == len(body):
            return content.strip()
        start = body.rfind(_BOXED + "{", 0, start)
    return None


def _balanced_content(text: str, open_index: int) -> str | None:
    """The text between text[open_index] == '{' and its matching '}', or None if unclosed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
    return None


def find_numbers(text: str) -> list[Decimal]:
    """Every number written in the text, as exact decimals, in order of appearance.

    Thousands commas are dropped ("1,200" -> 1200) and the Unicode minus counts as a sign;
    trailing zeros do not matter (Decimal("2.50") == Decimal("2.5")).
    """
    return [parse_number(m.group()) for m in _NUMBER.finditer(text)]


def remove_numbers(text: str) -> str:
    """The text with every number `find_numbers` sees cut out."""
    return _NUMBER.sub("", text)


def parse_number(token: str) -> Decimal:
    """One number as `find_numbers` reads them ("-1,200.5") -> Decimal; ValueError otherwise.

    Strict on purpose: "1e5", "nan", "1,2" and "1_000" are not numbers here.
    """
    cleaned = token.strip()
    if _NUMBER.fullmatch(cleaned) is None:
        raise ValueError(f"not a number: {token!r}")
    return Decimal(cleaned.replace(",", "").replace("−", "-"))


def single_integer(text: str) -> int | None:
    """The integer value of the one number in the text; None if there are 0 or >= 2 numbers
    or the number is not integral ("3.0" counts as 3, "3.5" does not).
    """
    numbers = find_numbers(text)
    if len(numbers) != 1 or numbers[0] != numbers[0].to_integral_value():
        return None
    return int(numbers[0])
