"""A deterministic generator of GSM8K-format word problems, for offline runs and tests.

Each problem comes from one of several templates with 2-4 arithmetic steps.
Every step is written the way GSM8K writes it, ``3*4 = <<3*4=12>>12``, and the
answer ends with ``#### N``, N being the last computed value.
"""

from __future__ import annotations

import random
from typing import Callable

TEST_SEED = "synthetic-test"  # a str seed: independent of split_seed, stable across Python runs
TEST_SIZE = 200

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal",
         "Keiko", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
GOODS = ["notebooks", "pens", "apples", "mugs", "candles", "socks", "stickers", "plants"]
TREATS = ["cookies", "marbles", "cards", "pencils", "seashells", "stamps"]
PLACES = [("farm", ("chickens", "cows", "goats")), ("zoo", ("birds", "monkeys", "zebras")),
          ("pet shop", ("fish", "rabbits", "hamsters")), ("ranch", ("horses", "sheep", "pigs"))]
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter"}


class Working:
    """The answer being written; ``calc`` annotates one step and remembers its value."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.value: int | None = None

    def calc(self, expr: str, value: int, unit: str = "") -> str:
        # The value is computed by the template in Python; tests re-evaluate `expr` to check it.
        self.value = value
        return f"{expr} = {unit}<<{expr}={value}>>{value}"

    def say(self, line: str) -> None:
        self.lines.append(line)

    def answer(self) -> str:
        return "\n".join(self.lines + [f"#### {self.value}"])


def shopping(rng: random.Random, w: Working) -> str:
    name = rng.choice(NAMES)
    item1, item2 = rng.sample(GOODS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 12)
    cost1, cost2 = a * p, b * q
    total = cost1 + cost2
    w.say(f"The {item1} cost {w.calc(f'{a}*{p}', cost1, '$')}.")
    w.say(f"The {item2} cost {w.calc(f'{b}*{q}', cost2, '$')}.")
    w.say(f"Together they cost {w.calc(f'{cost1}+{cost2}', total, '$')}.")
    question = f"{name} buys {a} {item1} at ${p} each and {b} {item2} at ${q} each."
    if rng.random() < 0.5:
        return question + f" How much does {name} spend?"
    bill = (total // 50 + 1) * 50
    w.say(f"{name} gets back {w.calc(f'{bill}-{total}', bill - total, '$')}.")
    return question + f" {name} pays with ${bill}. How much change does {name} get?"


def ages(rng: random.Random, w: Working) -> str:
    a, b, c = rng.sample(NAMES, 3)
    c_age, gap, times, years = rng.randint(3, 15), rng.randint(1, 6), rng.randint(2, 4), rng.randint(2, 10)
    b_age = c_age + gap
    a_age = times * b_age
    w.say(f"{b} is {w.calc(f'{c_age}+{gap}', b_age)} years old.")
    w.say(f"{a} is {w.calc(f'{times}*{b_age}', a_age)} years old.")
    w.say(f"In {years} years {a} will be {w.calc(f'{a_age}+{years}', a_age + years)} years old.")
    return (f"{c} is {c_age} years old. {b} is {gap} years older than {c}, and {a} is {times} times "
            f"as old as {b}. How old will {a} be in {years} years?")


def distance(rng: random.Random, w: Working) -> str:
    vehicle = rng.choice(["train", "bus", "car", "cyclist"])
    s1, h1, s2, h2 = rng.randint(3, 12) * 5, rng.randint(2, 6), rng.randint(3, 12) * 5, rng.randint(2, 6)
    d1, d2 = s1 * h1, s2 * h2
    w.say(f"First it covers {w.calc(f'{s1}*{h1}', d1)} km.")
    w.say(f"Then it covers {w.calc(f'{s2}*{h2}', d2)} km.")
    w.say(f"In total it travels {w.calc(f'{d1}+{d2}', d1 + d2)} km.")
    return (f"A {vehicle} travels at {s1} km per hour for {h1} hours, then at {s2} km per hour "
            f"for {h2} hours. How many kilometers does it travel in total?")


def sharing(rng: random.Random, w: Working) -> str:
    name, thing = rng.choice(NAMES), rng.choice(TREATS)
    friends, each, jars = rng.randint(2, 6), rng.randint(2, 8), rng.randint(2, 5)
    per_jar = rng.randint(2, 12)
    given = friends * each
    rest = jars * per_jar
    total = given + rest  # built backwards so the last division is exact
    w.say(f"{name} gives away {w.calc(f'{friends}*{each}', given)} {thing}.")
    w.say(f"That leaves {w.calc(f'{total}-{given}', rest)} {thing}.")
    w.say(f"Each jar gets {w.calc(f'{rest}/{jars}', per_jar)} {thing}.")
    return (f"{name} has {total} {thing}. {name} gives {each} to each of {friends} friends and "
            f"splits the rest equally into {jars} jars. How many {thing} go into each jar?")


def wages(rng: random.Random, w: Working) -> str:
    name = rng.choice(NAMES)
    rate, hours, days = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
    daily = rate * hours
    w.say(f"{name} earns {w.calc(f'{rate}*{hours}', daily, '$')} a day.")
    w.say(f"Over {days} days that is {w.calc(f'{daily}*{days}', daily * days, '$')}.")
    question = f"{name} earns ${rate} an hour and works {hours} hours a day for {days} days."
    if rng.random() < 0.5:
        return question + f" How much does {name} earn?"
    spent = rng.randint(1, daily * days - 1)
    w.say(f"{name} has {w.calc(f'{daily * days}-{spent}', daily * days - spent, '$')} left.")
    return question + f" {name} then spends ${spent}. How much money does {name} have left?"


def farm(rng: random.Random, w: Working) -> str:
    place, (kind1, kind2, kind3) = rng.choice(PLACES)
    first, second = rng.choice([2, 3, 4]), rng.choice([2, 3])
    n = rng.randint(2, 12) * first * second  # so both divisions below are exact
    part1 = n // first
    rest = n - part1
    part2 = rest // second
    w.say(f"There are {w.calc(f'{n}/{first}', part1)} {kind1}.")
    w.say(f"The other animals number {w.calc(f'{n}-{part1}', rest)}.")
    w.say(f"There are {w.calc(f'{rest}/{second}', part2)} {kind2}.")
    w.say(f"So there are {w.calc(f'{rest}-{part2}', rest - part2)} {kind3}.")
    return (f"A {place} has {n} animals. {FRACTIONS[first].capitalize()} of them are {kind1}, "
            f"{FRACTIONS[second]} of the rest are {kind2} and the others are {kind3}. "
            f"How many {kind3} are there?")


def discount(rng: random.Random, w: Working) -> str:
    name, item = rng.choice(NAMES), rng.choice(["jacket", "lamp", "backpack", "chair", "kettle"])
    price, pct, count = rng.randint(1, 10) * 20, rng.choice([10, 15, 20, 25, 30, 40, 50]), rng.randint(2, 5)
    off = price * pct // 100  # price is a multiple of 20, so this is exact
    sale = price - off
    w.say(f"The discount is {w.calc(f'{price}*{pct}/100', off, '$')}.")
    w.say(f"Each {item} costs {w.calc(f'{price}-{off}', sale, '$')}.")
    w.say(f"{name} pays {w.calc(f'{sale}*{count}', sale * count, '$')}.")
    return (f"A {item} costs ${price} and is on sale for {pct}% off. {name} buys {count} of them. "
            f"How much does {name} pay?")


def reading(rng: random.Random, w: Working) -> str:
    name = rng.choice(NAMES)
    weekday, weekend, weeks = rng.randint(5, 30), rng.randint(10, 60), rng.randint(2, 6)
    week = 5 * weekday + 2 * weekend
    w.say(f"On weekdays {name} reads {w.calc(f'5*{weekday}', 5 * weekday)} pages a week.")
    w.say(f"On weekends {name} reads {w.calc(f'2*{weekend}', 2 * weekend)} pages a week.")
    w.say(f"That is {w.calc(f'{5 * weekday}+{2 * weekend}', week)} pages a week.")
    w.say(f"In {weeks} weeks {name} reads {w.calc(f'{week}*{weeks}', week * weeks)} pages.")
    return (f"{name} reads {weekday} pages every weekday and {weekend} pages on each day of the "
            f"weekend. How many pages does {name} read in {weeks} weeks?")


TEMPLATES: list[Callable[[random.Random, Working], str]] = [
    shopping, ages, distance, sharing, wages, farm, discount, reading,
]


def problem(rng: random.Random) -> dict[str, str]:
    w = Working()
    question = rng.choice(TEMPLATES)(rng, w)
    return {"question": question, "answer": w.answer()}


def generate(n: int, seed: int | str, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """``n`` distinct problems from ``seed``, none whose question is in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(50 * n + 100):  # the templates allow millions of problems; this only stops a runaway
        if len(out) == n:
            return out
        p = problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    raise RuntimeError(f"could not generate {n} distinct synthetic problems")


def generate_test() -> list[dict[str, str]]:
    """The synthetic test split: fixed, whatever the spec's seeds and sizes."""
    return generate(TEST_SIZE, TEST_SEED)


def generate_train(n: int, split_seed: int) -> list[dict[str, str]]:
    """``n`` synthetic train+validation problems, disjoint from the test split."""
    exclude = frozenset(p["question"] for p in generate_test())
    return generate(n, f"synthetic-train-{split_seed}", exclude)
