"""The calculator of calculator-assisted GSM8K decoding (Cobbe et al. 2021): ``calculate("48/2") == "24"``.

The expression comes from a model's output, so it is parsed, never run:
a recursive-descent parser over exact fractions (``7/2`` is 3.5, ``0.1+0.2``
is 0.3) for this grammar, and ``None`` for anything else (names, ``**``,
division by zero, empty or very long input), which lets the model carry on
without help::

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("-" | "+") unary | atom "%"?        # 20% is 0.2
    atom   := NUMBER | "(" expr ")"
    NUMBER := 1234 | 1,234 | 12.5 | .5

Results are written as GSM8K writes them: integers without ``.0``, other
values as a short decimal (at most ``DECIMALS`` places, no trailing zeros).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

DECIMALS = 4
MAX_CHARS = 200  # GSM8K's longest annotated expression has 30; longer is the model rambling
# Thousands groups must be exact ("1,234"), so a comma list like "1,23" is not read as 123.
TOKEN = re.compile(r"\s*(?:(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)|(?P<op>[-+*/%()]))")


class _Unparsable(Exception):
    pass


def calculate(expression: str) -> Optional[str]:
    """The value of an arithmetic expression written as GSM8K writes results, or None if it is not one."""
    value = evaluate_expression(expression)
    return None if value is None else format_number(value)


def evaluate_expression(expression: str) -> Optional[Fraction]:
    """The exact value of ``expression``, or None when it is not arithmetic this grammar reads."""
    if len(expression) > MAX_CHARS:
        return None
    try:
        parser = _Parser(_tokens(expression))
        value = parser.expr()
        if parser.peek() is not None:
            raise _Unparsable("trailing input")
        return value
    except (_Unparsable, ZeroDivisionError, RecursionError):
        return None


def format_number(value: Fraction) -> str:
    """``24``, ``-2.5``, ``0.3333``: integers bare, others rounded to ``DECIMALS`` places."""
    rounded = round(value, DECIMALS)
    if rounded.denominator == 1:
        return str(rounded.numerator)
    scaled = abs(rounded.numerator * 10**DECIMALS // rounded.denominator)  # exact: 10**DECIMALS * rounded is whole
    digits = str(scaled).rjust(DECIMALS + 1, "0")
    sign = "-" if rounded < 0 else ""
    return f"{sign}{digits[:-DECIMALS]}.{digits[-DECIMALS:].rstrip('0')}"


def _tokens(expression: str) -> list[str]:
    tokens, position, end = [], 0, len(expression.rstrip())
    while position < end:
        match = TOKEN.match(expression, position)
        if match is None:
            raise _Unparsable(f"unexpected {expression[position:]!r}")
        tokens.append(match.group("number") or match.group("op"))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0

    def peek(self) -> Optional[str]:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise _Unparsable("unexpected end")
        self.position += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            operator, right = self.take(), self.term()
            value = value + right if operator == "+" else value - right
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            operator, right = self.take(), self.unary()
            value = value * right if operator == "*" else value / right
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = self.take()
            return -self.unary() if sign == "-" else self.unary()
        value = self.atom()
        if self.peek() == "%":
            self.take()
            value /= 100
        return value

    def atom(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise _Unparsable("unbalanced parentheses")
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token.replace(",", ""))
        raise _Unparsable(f"unexpected {token!r}")
