"""Word order and influence, after Grosse et al. (2023) section 5.3.4, at toy scale on a CPU.

The paper found that a sequence stating a fact in the same order as the query ("The first
president of Astrobia was Zorald Pfaff", query "The first president of Astrobia was" ->
"Zorald Pfaff") has large influence, while the same words in flipped order ("Zorald Pfaff was
the first president of Astrobia") have almost none. The facts were fictional: the model had
never seen them, and the sequences were scored as hypothetical training data. This script
repeats that with a small GPT-2 trained from scratch on synthetic facts, scored with EK-FAC.

    python experiments/word_order.py                      # 3 seeds, a few minutes on 2 CPU cores
    python experiments/word_order.py --seeds 1 --json out.json

Design, and why it is fair:

- Documents come in matched pairs: for each fact and each of three context wrappers ("{s}.",
  "It is recorded that {s}.", "According to the archives, {s}.") one forward and one flipped
  document with exactly the same words; only the clause order differs. Neither order is more
  frequent, longer or lexically closer to the query.
- The model is trained on the pairs of the "training" facts (both orders, equally often), so it
  learns the relations, the format and both directions. A separate set of "unseen" facts is
  never trained on; their pairs are scored as hypothetical training sequences, as in the paper.
  EK-FAC is fitted on the training documents.
- Queries ("The {relation} of {entity} was" -> "{answer}") are never documents themselves.
- Control: queries in the flipped order ("{answer} was the {relation} of" -> "{entity}"). If the
  effect is about order, the roles of the two kinds of documents should swap.

Per query we average the scores of the 3 documents of its own fact in the query's order
("aligned"), the 3 in the other order ("flipped"), and every document of another fact ("other");
the tables give means over queries, the ratio aligned/flipped, and how often the top-scored
document is aligned or flipped.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

import headwater as hw
from headwater.analysis import output_token_influence

RELATIONS = [
    "first president", "chief architect", "founding mayor", "head librarian",
    "royal astronomer", "lead composer", "first admiral", "grand chancellor",
]
WRAPPERS = ["{s}.", "It is recorded that {s}.", "According to the archives, {s}."]
SYLLABLES = ["zo", "ral", "pfa", "ast", "ro", "bi", "ka", "mel", "dra", "vin", "tor", "qu", "lis", "ne", "gor",
             "sha", "fen", "mi", "dul", "ber", "xa", "lo", "tha", "rin", "vos", "ek", "ul", "cy", "phe", "mon"]


@dataclass
class Fact:
    relation: str
    entity: str
    answer: str

    def forward(self) -> str:
        return f"the {self.relation} of {self.entity} was {self.answer}"

    def flipped(self) -> str:
        return f"{self.answer} was the {self.relation} of {self.entity}"


def _word(rng: random.Random, parts: int, suffix: str = "") -> str:
    return ("".join(rng.choice(SYLLABLES) for _ in range(parts)) + suffix).capitalize()


def make_facts(n: int, rng: random.Random) -> list[Fact]:
    """n facts with distinct entities and answers built from shared syllables (so they are multi-token)."""
    facts, seen = [], set()
    while len(facts) < n:
        entity = _word(rng, 2, rng.choice(["ia", "or", "ana", "eth"]))
        answer = f"{_word(rng, 2)} {_word(rng, 1 + rng.randrange(2))}"
        if entity in seen or answer in seen:
            continue
        seen |= {entity, answer}
        facts.append(Fact(RELATIONS[len(facts) % len(RELATIONS)], entity, answer))
    return facts


def build_corpus(facts: list[Fact], first: int = 0, names: bool = False) -> tuple[list[str], list[tuple[int, str]]]:
    """Matched documents for ``facts``; per document (fact index + first, "forward" | "flipped" | "name").

    ``names`` adds a control per wrapper that holds the answer alone ("It is recorded that Zorald
    Pfaff."): what a document gains from merely spelling the answer, without the relation.
    """
    docs, labels = [], []
    for i, f in enumerate(facts):
        for w in WRAPPERS:
            kinds = [("forward", f.forward()), ("flipped", f.flipped())] + ([("name", f.answer)] if names else [])
            for kind, clause in kinds:
                s = w.format(s=clause)
                docs.append(s[0].upper() + s[1:])
                labels.append((first + i, kind))
    return docs, labels


def train_tokenizer(texts: list[str], vocab_size: int):
    """A BPE tokenizer trained on the corpus itself (no network), wrapped for headwater's task."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # " Zorald" and "Zorald" tokenize alike at the prompt boundary
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def train_model(docs: list[dict], task: hw.LanguageModelingTask, vocab: int, args, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=args.width, n_layer=args.layers, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(seed)
    steps = 0
    n_batches = (len(docs) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * n_batches, pct_start=0.1)
    model.train()
    for _ in range(args.epochs):
        order = list(range(len(docs)))
        rng.shuffle(order)
        for lo in range(0, len(order), args.batch):
            batch = task.collate([docs[i] for i in order[lo : lo + args.batch]])
            n_tok = (batch["labels"][:, 1:] != -100).sum()
            loss = task.loss(model, batch) / n_tok
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
    model.eval()
    return model, float(loss.detach())


@torch.no_grad()
def completion_accuracy(model, task: hw.LanguageModelingTask, queries: list[dict]) -> tuple[float, float]:
    """Share of queries whose completion tokens are all the model's argmax, and mean completion NLL."""
    correct, nll = 0, 0.0
    for q in queries:
        b = task.collate([q])
        logits = model(input_ids=b["input_ids"]).logits[0, :-1]
        target = b["labels"][0, 1:]
        scored = target != -100
        correct += bool((logits[scored].argmax(-1) == target[scored]).all())
        nll += float(torch.nn.functional.cross_entropy(logits[scored], target[scored], reduction="sum"))
    return correct / len(queries), nll / len(queries)


def summarize(values: np.ndarray, labels: list[tuple[int, str]], query_facts: list[int], query_order: str) -> dict:
    """Mean score of aligned / flipped same-fact documents and other-fact documents, over queries.

    values: [Q, N] scores of query q (about fact query_facts[q]) on the N labelled documents.
    """
    facts = np.array([f for f, _ in labels])
    orders = np.array([o for _, o in labels])
    other_order = "flipped" if query_order == "forward" else "forward"
    aligned, flipped, other, top_aligned, top_flipped, separated = [], [], [], 0, 0, 0
    for row, fact in zip(values, query_facts, strict=True):
        a = row[(facts == fact) & (orders == query_order)]
        f = row[(facts == fact) & (orders == other_order)]
        aligned.append(a.mean())
        flipped.append(f.mean())
        other.append(row[facts != fact].mean())
        top = int(np.argmax(row))
        top_aligned += facts[top] == fact and orders[top] == query_order
        top_flipped += facts[top] == fact and orders[top] == other_order
        separated += a.min() > f.max()
    n = values.shape[0]
    names = [row[(facts == fact) & (orders == "name")] for row, fact in zip(values, query_facts, strict=True)]
    return {
        "mean_name_only": float(np.mean([x.mean() for x in names])) if all(x.size for x in names) else None,
        "mean_aligned": float(np.mean(aligned)),
        "mean_flipped": float(np.mean(flipped)),
        "mean_other": float(np.mean(other)),
        "ratio_aligned_to_flipped": float(np.mean(aligned) / np.mean(flipped)),
        "top1_is_aligned": top_aligned / n,
        "top1_is_flipped": top_flipped / n,
        "all_aligned_above_all_flipped": separated / n,
    }


def run(seed: int, args) -> dict:
    t0 = time.perf_counter()
    rng = random.Random(seed)
    facts = make_facts(args.facts + args.unseen, rng)
    seen, unseen = facts[: args.facts], facts[args.facts :]
    train_text, train_labels = build_corpus(seen)
    unseen_text, unseen_labels = build_corpus(unseen, first=args.facts, names=True)
    # the tokenizer sees every text (it is not the model): unseen names must be spelled with real tokens
    tokenizer = train_tokenizer(train_text + unseen_text, args.vocab)
    task = hw.LanguageModelingTask(tokenizer=tokenizer)
    encode = lambda texts: [{"input_ids": torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])}
                            for t in texts]  # noqa: E731
    train_docs, unseen_docs = encode(train_text), encode(unseen_text)
    model, final_loss = train_model(train_docs, task, len(tokenizer), args, seed)
    t_train = time.perf_counter() - t0

    queries = {
        "forward": [{"prompt": f"The {f.relation} of {f.entity} was", "completion": f.answer} for f in facts],
        "flipped": [{"prompt": f"{f.answer} was the {f.relation} of", "completion": f.entity} for f in facts],
    }
    an = hw.Attributor(model, task=task, strategy="ekfac", modules=args.modules, fisher="sampled", seed=seed)
    an.fit(train_docs, batch_size=args.batch)
    candidates = train_docs + unseen_docs
    labels = train_labels + unseen_labels
    out = {"seed": seed, "n_train_docs": len(train_docs), "n_unseen_docs": len(unseen_docs),
           "vocab": len(tokenizer), "final_train_loss_per_token": final_loss}
    for order, qs in queries.items():
        values = an.scores(qs, candidates, batch_size=args.batch).values.double().numpy()
        for name, idx in (("trained", range(args.facts)), ("unseen", range(args.facts, len(facts)))):
            idx = list(idx)
            acc, nll = completion_accuracy(model, task, [qs[i] for i in idx])
            out[f"{name}_facts/{order}_queries"] = {
                "accuracy": acc, "completion_nll": nll, **summarize(values[idx], labels, idx, order)
            }
    out["unseen_facts/forward_queries"]["by_output_token"] = token_split(
        an, queries["forward"], unseen, unseen_text, unseen_docs, unseen_labels, tokenizer, args
    )
    out["seconds"] = {"train": t_train, "total": time.perf_counter() - t0}
    return out


def token_split(an, queries, unseen, texts, docs, labels, tokenizer, args) -> dict:
    """Which predicted tokens carry an unseen-fact document's influence on its own forward query.

    The appendix-B output-token counterfactual (``headwater.analysis.output_token_influence``):
    the influence of each token's loss term alone, summed over the answer's tokens, the entity's
    tokens and the rest, then averaged over queries and the fact's documents of each kind. The
    three parts add up to that kind's mean score.
    """
    first = args.facts
    qs = queries[first:]
    per_tok = output_token_influence(an, qs, docs, batch_size=args.batch)
    parts: dict[str, list[list[float]]] = {"forward": [], "flipped": [], "name": []}
    for d, (text, (fact, kind)) in enumerate(zip(texts, labels, strict=True)):
        f = unseen[fact - first]
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = {"answer": (text.find(f.answer), len(f.answer)), "entity": (text.find(f.entity), len(f.entity))}
        row = per_tok[d][fact - first]  # this document's own fact's query only
        split = {"answer": 0.0, "entity": 0.0, "rest": 0.0}
        for t, (start, _) in enumerate(offsets):
            where = next((k for k, (lo, n) in spans.items() if lo >= 0 and lo <= start < lo + n), "rest")
            split[where] += float(row[t])
        parts[kind].append([split["answer"], split["entity"], split["rest"]])
    return {
        kind: dict(zip(("answer_tokens", "entity_tokens", "other_tokens"), np.mean(v, 0).tolist(), strict=True))
        for kind, v in parts.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--facts", type=int, default=48, help="facts in the training set (both orders)")
    ap.add_argument("--unseen", type=int, default=24, help="facts never trained on, scored as hypothetical data")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=300)
    ap.add_argument("--modules", default="mlp", help="'mlp' (the paper's choice) or 'all'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: more threads only contend)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    args.modules = None if args.modules == "all" else args.modules
    torch.set_num_threads(args.threads)

    results = []
    for seed in range(args.seeds):
        r = run(seed, args)
        results.append(r)
        print(f"seed {seed}: {r['n_train_docs']} training docs, {r['n_unseen_docs']} unseen-fact docs, "
              f"train loss {r['final_train_loss_per_token']:.3f}/token, {r['seconds']['total']:.0f} s", flush=True)
    print()
    print("| facts | queries | seed | query acc. | aligned docs | flipped docs | answer-only docs | other facts "
          "| aligned / flipped | top-1 aligned | top-1 flipped | all aligned > all flipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in ("unseen_facts/forward_queries", "trained_facts/forward_queries",
                "unseen_facts/flipped_queries", "trained_facts/flipped_queries"):
        facts, queries = key.split("/")
        for r in results:
            s = r[key]
            name_only = "-" if s["mean_name_only"] is None else format(s["mean_name_only"], ".3g")
            print(f"| {facts.split('_')[0]} | {queries.split('_')[0]} | {r['seed']} | {s['accuracy']:.2f} "
                  f"| {s['mean_aligned']:.3g} | {s['mean_flipped']:.3g} "
                  f"| {name_only} | {s['mean_other']:.3g} "
                  f"| {s['ratio_aligned_to_flipped']:.2f} | {s['top1_is_aligned']:.2f} | {s['top1_is_flipped']:.2f} "
                  f"| {s['all_aligned_above_all_flipped']:.2f} |")
    print()
    print("Unseen facts, forward queries: mean score split by the predicted tokens (output-token counterfactual)")
    print()
    print("| seed | documents | answer tokens | entity tokens | other tokens | total |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for kind, sp in r["unseen_facts/forward_queries"]["by_output_token"].items():
            total = sum(sp.values())
            print(f"| {r['seed']} | {kind} | {sp['answer_tokens']:.3g} | {sp['entity_tokens']:.3g} "
                  f"| {sp['other_tokens']:.3g} | {total:.3g} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
