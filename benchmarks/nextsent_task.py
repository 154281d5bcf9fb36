"""A labelled sentence-pair task built from the offline corpora: does sentence B follow sentence A?

    python benchmarks/nextsent_task.py --out runs/nextsent

Writes JSON Lines files for `attnswap finetune --task classification` and `attnswap eval calibration`, each line
{"text": A, "text_pair": B, "label": "next" | "other"}, half of each label:
- "next": B is the sentence right after A in the same paragraph;
- "other": with --negatives same-article (default), a sentence of the same article at least 3 sentences away
  from A (same topic: the task is about order and coherence, and hard for a small encoder); with --negatives
  other-article, a sentence of another article (a change of topic gives it away: an easier task).
Files:
- train.jsonl (--train examples): Wikipedia prose (train-wikipedia-enwiki2021.txt) from its first article on;
- test-wikipedia.jsonl (--test examples): the same file from character 8,000,000 (other articles);
- test-wikitext.jsonl (--test examples): WikiText-2 test (tokenised " , " style: another domain).
Sentences are split at ". ", "! ", "? " before a capital letter and kept at 6-60 words. Seeded: the same
arguments give the same files.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SPLIT.split(paragraph.strip()) if 6 <= len(s.split()) <= 60]


def wikipedia_articles(text: str) -> list[list[list[str]]]:
    """Articles as lists of paragraphs of sentences (title line, blank line, one paragraph per line, blank line)."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    articles = []
    for block in blocks:
        paras = [sentences(line) for line in block.splitlines() if len(line.split()) > 12]
        paras = [p for p in paras if p]
        if sum(len(p) for p in paras) >= 6:
            articles.append(paras)
    return articles


def wikitext_articles(text: str) -> list[list[list[str]]]:
    """WikiText raw: articles start at ' = Title = ' lines; one paragraph per line."""
    articles, current = [], []
    for line in text.splitlines():
        if re.match(r"^ = [^=].* = $", line):
            if current:
                articles.append(current)
            current = []
        elif line.strip() and not line.strip().startswith("="):
            p = sentences(line)
            if p:
                current.append(p)
    if current:
        articles.append(current)
    return [a for a in articles if sum(len(p) for p in a) >= 6]


def examples(articles, n: int, rng: random.Random, negatives: str = "same-article") -> list[dict]:
    out = []
    per_article = max(4, -(-2 * n // len(articles)))  # anchors per article: many articles, not a few long ones
    order = list(range(len(articles)))
    rng.shuffle(order)
    for ai in order:
        art = articles[ai]
        flat = [(pi, si) for pi, p in enumerate(art) for si in range(len(p))]
        pos = {x: i for i, x in enumerate(flat)}
        pairs = [(pi, si) for pi, p in enumerate(art) for si in range(len(p) - 1)]
        rng.shuffle(pairs)
        for pi, si in pairs[:per_article]:
            a = art[pi][si]
            if len(out) % 2 == 0:
                out.append({"text": a, "text_pair": art[pi][si + 1], "label": "next"})
            elif negatives == "other-article":
                other = articles[rng.choice([i for i in range(max(0, ai - 50), min(len(articles), ai + 50))
                                             if i != ai])]
                para = rng.choice(other)
                out.append({"text": a, "text_pair": rng.choice(para), "label": "other"})
            else:
                far = [x for x in flat if abs(pos[x] - pos[(pi, si)]) >= 3]
                if not far:
                    continue
                qi, qj = rng.choice(far)
                out.append({"text": a, "text_pair": art[qi][qj], "label": "other"})
            if len(out) == n:
                return out
    raise SystemExit(f"only {len(out)} examples could be built; ask for fewer")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/nextsent")
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", default="same-article", choices=["same-article", "other-article"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wiki = (DATA / "train-wikipedia-enwiki2021.txt").read_text(encoding="utf-8")
    sets = {
        "train.jsonl": examples(wikipedia_articles(wiki[:4_000_000]), args.train, random.Random(args.seed),
                                args.negatives),
        "test-wikipedia.jsonl": examples(wikipedia_articles(wiki[8_000_000:]), args.test,
                                         random.Random(args.seed + 1), args.negatives),
        "test-wikitext.jsonl": examples(wikitext_articles((DATA / "wikitext2-test.txt").read_text(encoding="utf-8")),
                                        args.test, random.Random(args.seed + 2), args.negatives),
    }
    for name, rows in sets.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}: {len(rows)} examples, {sum(r['label'] == 'next' for r in rows)} 'next'")


if __name__ == "__main__":
    main()
