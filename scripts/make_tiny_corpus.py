#!/usr/bin/env python3
"""Generate the small datasets shipped in data/ (deterministic: same files every run).

  data/tiny_corpus.jsonl        {"text": ...}            short stories, facts, arithmetic, sequences
  data/tiny_instructions.jsonl  {"prompt", "response"}   questions with short answers
  data/tiny_chat.jsonl          {"messages": [...]}      one- to three-turn chats

The text is templated English with a lot of regular structure (fixed facts, arithmetic that
is always right, recurring characters), so a tiny byte-level model's loss falls fast and
keeps falling: spelling first, then the templates, then the facts.

    python scripts/make_tiny_corpus.py [--out data] [--docs 2400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Emma", "she"), ("Felix", "he"),
         ("Grace", "she"), ("Henry", "he"), ("Iris", "she"), ("Jack", "he"), ("Lena", "she"), ("Max", "he"),
         ("Nora", "she"), ("Oscar", "he"), ("Rosa", "she"), ("Sam", "he"), ("Tara", "she"), ("Leo", "he")]
PLACES = ["village", "town", "city", "valley", "island", "forest", "harbor", "farm"]
HOMES = ["small house", "old cottage", "blue house", "wooden cabin", "tall apartment", "stone house"]
SHOPS = [("bakery", "bread"), ("market", "apples"), ("library", "a book"), ("shop", "milk"),
         ("garden", "flowers"), ("river", "fresh water")]
ANIMALS = [("cat", "meows", "mice"), ("dog", "barks", "bones"), ("cow", "moos", "grass"), ("duck", "quacks", "bread"),
           ("horse", "neighs", "hay"), ("sheep", "baas", "grass"), ("owl", "hoots", "mice"), ("frog", "croaks", "flies"),
           ("bird", "sings", "seeds"), ("lion", "roars", "meat")]
ADJS = ["little", "tired", "hungry", "friendly", "curious", "sleepy", "lost", "happy"]
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "a plum": "purple", "the sun": "yellow", "the sea": "blue"}
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "India": "New Delhi", "China": "Beijing", "Brazil": "Brasilia",
            "Mexico": "Mexico City", "Poland": "Warsaw", "Chile": "Santiago", "Ireland": "Dublin",
            "Portugal": "Lisbon", "Austria": "Vienna"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
WEATHER = [("rainy", "took an umbrella"), ("sunny", "wore a hat"), ("cold", "put on a warm coat"),
           ("windy", "held on to the hat"), ("snowy", "wore boots")]


def story(r: random.Random) -> str:
    (name, he), (friend, _) = r.sample(NAMES, 2)
    his = "her" if he == "she" else "his"
    place, home = r.choice(PLACES), r.choice(HOMES)
    shop, item = r.choice(SHOPS)
    animal, sound, food = r.choice(ANIMALS)
    adj = r.choice(ADJS)
    weather, wear = r.choice(WEATHER)
    day = r.choice(DAYS)
    n = r.randint(2, 9)
    parts = [
        f"Once upon a time, {name} lived in a {home} in a quiet {place}.",
        f"On {day}, the weather was {weather}, so {he} {wear}.",
        f"Every morning {he} walked to the {shop} to get {item}.",
        f"One day {he} found a {adj} {animal} near the {shop}.",
        f"The {animal} looked up at {name}. It {sound} softly.",
        f"\"Are you hungry?\" asked {name}. The {animal} {sound} again.",
        f"{name} knew that a {animal} likes {food}, so {he} gave it some {food}.",
        f"Then {he} called {his} friend {friend}, and together they counted {NUMBER_WORDS[n]} {animal}s in the {place}.",
        f"From that day on, the {animal} followed {name} everywhere.",
        f"{name} and {friend} were very happy. The end.",
    ]
    # Drop a middle sentence or two so that stories are not all identical in shape.
    drop = set(r.sample(range(1, 8), r.randint(0, 2)))
    return " ".join(p for i, p in enumerate(parts) if i not in drop)


def facts(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        items = r.sample(sorted(CAPITALS), r.randint(3, 6))
        return " ".join(f"The capital of {c} is {CAPITALS[c]}." for c in items)
    if kind == 1:
        items = r.sample(ANIMALS, r.randint(3, 6))
        return " ".join(f"A {a} {s}. A {a} eats {f}." for a, s, f in items)
    if kind == 2:
        items = r.sample(sorted(COLORS), r.randint(3, 6))
        return " ".join(f"The color of {t} is {COLORS[t]}." for t in items)
    if kind == 3:
        i = r.randrange(7)
        seq = [DAYS[(i + k) % 7] for k in range(7)]
        j = r.randrange(12)
        months = [MONTHS[(j + k) % 12] for k in range(r.randint(3, 6))]
        return (f"The days of the week, starting on {seq[0]}: {', '.join(seq)}. After {seq[0]} comes {seq[1]}. "
                f"Months in order: {', '.join(months)}. After {months[0]} comes {months[1]}.")
    k = r.randint(3, 8)
    return (f"The planets in order from the sun are {', '.join(PLANETS[:-1])} and {PLANETS[-1]}. "
            f"Planet number {k} is {PLANETS[k - 1]}. We live on Earth, the third planet.")


def arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(4, 9)):
        a, b = r.randint(0, 20), r.randint(0, 20)
        op = r.randrange(4)
        if op == 0:
            lines.append(f"{a} + {b} = {a + b}.")
        elif op == 1:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} - {b} = {a - b}.")
        elif op == 2:
            a, b = a % 11, b % 11
            lines.append(f"{a} times {b} is {a * b}.")
        else:
            a = r.randint(0, 19)
            lines.append(f"After {NUMBER_WORDS[a]} comes {NUMBER_WORDS[a + 1]}.")
    start = r.randint(1, 10)
    step = r.randint(1, 5)
    seq = [start + step * i for i in range(6)]
    lines.append(f"Counting by {step} from {start}: {', '.join(map(str, seq))}.")
    return "Math practice. " + " ".join(lines)


def corpus(r: random.Random, n_docs: int) -> list[dict]:
    makers = [story, story, facts, arithmetic]
    docs = []
    for _ in range(n_docs):
        # Two to four pieces per document: documents of a few hundred bytes to ~2 KB.
        pieces = [r.choice(makers)(r) for _ in range(r.randint(2, 4))]
        docs.append({"text": "\n\n".join(pieces)})
    return docs


def qa_pair(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(9)
    if kind == 6:
        a, b = r.randint(0, 12), r.randint(0, 12)
        return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
    if kind == 7:
        a, b = sorted((r.randint(0, 30), r.randint(0, 30)), reverse=True)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
    if kind == 8:
        m = r.randrange(12)
        return f"Which month comes after {MONTHS[m]}?", f"After {MONTHS[m]} comes {MONTHS[(m + 1) % 12]}."
    if kind == 0:
        c = r.choice(sorted(CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
    if kind == 1:
        a, s, f = r.choice(ANIMALS)
        return r.choice([(f"What sound does a {a} make?", f"A {a} {s}."), (f"What does a {a} eat?", f"A {a} eats {f}.")])
    if kind == 2:
        a, b = r.randint(0, 20), r.randint(0, 20)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    if kind == 3:
        t = r.choice(sorted(COLORS))
        return f"What color is {t}?", f"The color of {t} is {COLORS[t]}."
    if kind == 4:
        d = r.randrange(7)
        return f"Which day comes after {DAYS[d]}?", f"After {DAYS[d]} comes {DAYS[(d + 1) % 7]}."
    k = r.randint(1, 8)
    return f"Which planet is number {k} from the sun?", f"Planet number {k} is {PLANETS[k - 1]}."


def instructions(r: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:  # unique rows: a duplicate could land in both train and validation
        q, a = qa_pair(r)
        if q not in seen:
            seen.add(q)
            rows.append({"prompt": f"Question: {q}\nAnswer:", "response": f" {a}"})
    return rows


def chats(r: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        msgs = []
        if r.random() < 0.3:
            msgs.append({"role": "system", "content": "You are a helpful assistant who answers in one short sentence."})
        for _ in range(r.randint(1, 3)):
            q, a = qa_pair(r)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        key = json.dumps(msgs)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data"))
    ap.add_argument("--docs", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "tiny_corpus.jsonl", corpus(random.Random(args.seed), args.docs))
    write_jsonl(out / "tiny_instructions.jsonl", instructions(random.Random(args.seed + 1), 400))
    write_jsonl(out / "tiny_chat.jsonl", chats(random.Random(args.seed + 2), 200))


if __name__ == "__main__":
    main()
