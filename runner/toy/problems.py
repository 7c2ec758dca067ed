"""Synthetic GSM8K-style word problems for the embedded default model.

A problem is a *chain*: a start value and 1..6 operations (+k, -k with k in 1..5, x2, x3,
halving of even values), every value kept in 1..40 so that each number is one token.
Each sentence of a question is exactly five tokens long, so a question's length depends only
on its number of steps. Solutions are written in GSM8K's own format (`<<a+b=c>>c` per step,
then `#### answer`), so the difficulty rule and the answer parser of `runner.data` and
`runner.answers` serve GSM8K and this set alike.

Train/test disjointness is by construction: a stable hash of the chain (start + operations,
ignoring names and wording) sends every chain to exactly one split, so no computation of the
built-in test set is ever seen in training, under any name or phrasing.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

MAX_VALUE = 40
MAX_START = 30
MAX_STEPS = 6
TEST_SHARE = 5  # one chain in five belongs to the test split
BUILTIN_PER_DIFFICULTY = 200
BUILTIN_SEED = 20_26
BUILTIN_PATH = Path(__file__).with_name("builtin.jsonl")

# (name, subject pronoun, possessive pronoun)
NAMES = [
    ("Ann", "She", "her"), ("Ben", "He", "his"), ("Cara", "She", "her"), ("Dev", "He", "his"),
    ("Eva", "She", "her"), ("Finn", "He", "his"), ("Gia", "She", "her"), ("Hugo", "He", "his"),
    ("Ines", "She", "her"), ("Jack", "He", "his"), ("Kira", "She", "her"), ("Liam", "He", "his"),
    ("Maya", "She", "her"), ("Noah", "He", "his"), ("Olga", "She", "her"), ("Pablo", "He", "his"),
    ("Rosa", "She", "her"), ("Sam", "He", "his"), ("Tara", "She", "her"), ("Umar", "He", "his"),
]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pencils",
         "cookies", "stamps", "beads", "plums"]
START_VERBS = ["has", "owns", "keeps", "holds"]
ADD_VERBS = ["buys", "finds", "gets", "wins", "picks"]
SUB_VERBS = ["loses", "sells", "drops", "donates", "trades"]
# Each operation phrasing is exactly five tokens: "She buys 3 more ." / "She doubles her apples ."
OPS = ("+", "-", "*2", "*3", "/2")


@dataclass(frozen=True)
class Chain:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 3), ("-", 2), ("*", 2), ("*", 3), ("/", 2)

    def values(self) -> list[int]:
        """The start value and every intermediate result, the last being the answer."""
        values = [self.start]
        for op, k in self.ops:
            values.append(apply_op(values[-1], op, k))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def split(self) -> str:
        key = json.dumps([self.start, self.ops]).encode()
        digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
        return "test" if digest % TEST_SHARE == 0 else "train"


def apply_op(value: int, op: str, k: int) -> int:
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    if op == "*":
        return value * k
    assert op == "/" and value % k == 0, f"halving needs an even value, got {value}"
    return value // k


def valid_ops(value: int) -> list[tuple[str, int]]:
    """Every operation that keeps the value inside 1..MAX_VALUE (halving only of even values)."""
    ops = [("+", k) for k in range(1, 6) if value + k <= MAX_VALUE]
    ops += [("-", k) for k in range(1, 6) if value - k >= 1]
    ops += [("*", m) for m in (2, 3) if value * m <= MAX_VALUE]
    if value % 2 == 0:
        ops.append(("/", 2))
    return ops


def sample_chain(rng: random.Random, steps: int) -> Chain:
    start = rng.randint(1, MAX_START)
    ops, value = [], start
    for _ in range(steps):
        # Pick the operation kind first so that x2/x3/halving are not drowned by the ten +k/-k.
        kinds = {op: [o for o in valid_ops(value) if o[0] == op] for op in "+-*/"}
        op_kind = rng.choice([kind for kind, options in kinds.items() if options])
        op = rng.choice(kinds[op_kind])
        ops.append(op)
        value = apply_op(value, *op)
    return Chain(start, tuple(ops))


def sample_chain_in(rng: random.Random, steps: int, split: str) -> Chain:
    while True:
        chain = sample_chain(rng, steps)
        if chain.split() == split:
            return chain


@dataclass(frozen=True)
class ToyProblem:
    chain: Chain
    name: str
    subject: str
    possessive: str
    item: str
    start_verb: str
    verbs: tuple[str, ...]  # one wording choice per operation

    @property
    def question(self) -> str:
        sentences = [f"{self.name} {self.start_verb} {self.chain.start} {self.item}."]
        for (op, k), verb in zip(self.chain.ops, self.verbs):
            sentences.append(self._sentence(op, k, verb))
        sentences.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(sentences)

    def _sentence(self, op: str, k: int, verb: str) -> str:
        if op == "+":
            return f"{self.subject} {verb} {k} more."
        if op == "-":
            return f"{self.subject} {verb} {k} {self.item}."
        if op == "*":
            return f"{self.subject} {'doubles' if k == 2 else 'triples'} {self.possessive} {self.item}."
        return f"{self.subject} gives {verb}."

    @property
    def solution(self) -> str:
        """GSM8K-format solution: one `<<a op b=c>>c` line per step, then `#### answer`."""
        values = self.chain.values()
        lines = []
        for (op, k), before, after in zip(self.chain.ops, values, values[1:]):
            lines.append(f"{before}{op}{k}=<<{before}{op}{k}={after}>>{after} {self.item}.")
        return "\n".join(lines) + f"\n#### {self.chain.answer}"

    @property
    def cot(self) -> str:
        """The explicit chain of thought the teacher is trained on (CODI's GSM8k-Aug style)."""
        values = self.chain.values()
        return " ".join(f"<<{a}{op}{k}={b}>>" for (op, k), a, b in zip(self.chain.ops, values, values[1:]))


def dress(rng: random.Random, chain: Chain) -> ToyProblem:
    """Give a chain a name, an item and a wording for each step."""
    name, subject, possessive = rng.choice(NAMES)
    verbs = []
    for op, _ in chain.ops:
        if op == "+":
            verbs.append(rng.choice(ADD_VERBS))
        elif op == "-":
            verbs.append(rng.choice(SUB_VERBS))
        elif op == "/":
            verbs.append(rng.choice(["half away", "away half"]))
        else:
            verbs.append("")
    return ToyProblem(chain, name, subject, possessive, rng.choice(ITEMS),
                      rng.choice(START_VERBS), tuple(verbs))


def sample_problem(rng: random.Random, steps: int, split: str) -> ToyProblem:
    return dress(rng, sample_chain_in(rng, steps, split))


def builtin_problems(per_difficulty: int = BUILTIN_PER_DIFFICULTY, seed: int = BUILTIN_SEED) -> list[dict]:
    """The built-in test set: `per_difficulty` distinct questions per step count, test split only."""
    rng = random.Random(seed)
    by_steps = []
    for steps in range(1, MAX_STEPS + 1):
        seen: dict[str, ToyProblem] = {}
        while len(seen) < per_difficulty:
            problem = sample_problem(rng, steps, "test")
            seen.setdefault(problem.question, problem)
        by_steps.append([{"id": f"builtin-{steps}-{i:03d}", "question": p.question, "answer": p.solution,
                          "reasoning_steps": steps} for i, p in enumerate(seen.values())])
    # Interleaved by step count, so that any `--limit N` prefix is balanced across difficulties.
    return [row for group in zip(*by_steps) for row in group]


def write_builtin(path: Path = BUILTIN_PATH) -> None:
    with open(path, "w") as f:
        for row in builtin_problems():
            f.write(json.dumps(row) + "\n")


def vocabulary() -> list[str]:
    """Every whole word the generator can emit, before byte-level pre-tokenisation."""
    words = {"<<", ">>", "+", "-", "*", "/", "=", ":", ".", "?", "The", "answer", "is", "half",
             "away", "more", "How", "many", "does", "have", "now", "doubles", "triples", "her", "his"}
    words |= {n for n, _, _ in NAMES} | {s for _, s, _ in NAMES} | set(ITEMS)
    words |= set(START_VERBS) | set(ADD_VERBS) | set(SUB_VERBS) | {"gives"}
    words |= {str(n) for n in range(0, MAX_VALUE + 1)}
    return sorted(words)


if __name__ == "__main__":
    write_builtin()
    print(f"wrote {BUILTIN_PATH}")
