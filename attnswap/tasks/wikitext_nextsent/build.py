"""Build nextsent.jsonl: a 4-way next-sentence choice from WikiText-2 test (Merity et al. 2016, CC BY-SA 3.0).

Each item: one sentence of a paragraph (the context) and four candidates for the sentence that follows it in
the same paragraph: the true one and three sentences drawn (seeded) from other articles, of a length within
a factor of two of the true one. The label is the true one's position. Run once; the file is committed:

    python attnswap/tasks/wikitext_nextsent/build.py ../shared/data/wikitext2-test.txt
"""
import json
import random
import re
import sys
from pathlib import Path

ITEMS = 500


def sentences(paragraph: str) -> list[str]:
    parts = re.split(r"(?<= \.) (?=[A-Z])", paragraph.strip())
    return [p.strip() for p in parts if 8 <= len(p.split()) <= 60 and "<unk>" not in p]


def main(path: str) -> None:
    articles, current = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r" = [^=].* = ", line):  # a new article
            if current:
                articles.append(current)
            current = []
        elif line.strip() and not line.startswith(" = "):
            current.append(sentences(line))
    articles.append(current)
    pool = [(a, s) for a, paras in enumerate(articles) for para in paras for s in para]
    rng = random.Random(0)
    pairs = [(a, p[i], p[i + 1]) for a, paras in enumerate(articles) for p in paras for i in range(len(p) - 1)]
    rng.shuffle(pairs)
    out = []
    for a, context, true in pairs[:ITEMS]:
        n = len(true.split())
        others = [s for b, s in pool if b != a and n / 2 <= len(s.split()) <= 2 * n]
        choices = rng.sample(others, 3)
        label = rng.randrange(4)
        choices.insert(label, true)
        out.append({"context": context, "choices": choices, "label": label})
    target = Path(__file__).with_name("nextsent.jsonl")
    target.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out), encoding="utf-8")
    print(f"{len(out)} items from {len(pairs)} sentence pairs in {len(articles)} articles -> {target}")


if __name__ == "__main__":
    main(sys.argv[1])
