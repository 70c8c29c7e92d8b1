"""A synthetic world with known answers: facts about fictional people, a tokenizer and a GPT-2 trained on them.

Shared by the demo (``headwater demo``) and the evaluation suite (``headwater.evaluate``).

The corpus is about fictional people. Each person has three facts (birthplace, profession,
dog's name), and each fact is stated in four paraphrases, one document each, some with an
unrelated sentence before or after it. Distractors are documents that mention a person
without stating a queried fact, documents that describe a birthplace without saying who was
born there (they contain the answer word, so they are hard negatives), and filler text.
Every fact's value is unique to it, so the ground truth is exact: the documents that state
fact f are the ones that could have taught the model the answer to query f.

A query is the first paraphrase's prompt ("Quibu Kamar was born in") with the value as the
completion; a good attribution puts that fact's four documents in the top 10 of ~380.

Nothing here touches the network: the tokenizer is a byte-level BPE trained with
``tokenizers`` on the corpus, and the model is a ``transformers`` GPT-2 trained from scratch.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DemoConfig",
    "FULL",
    "SMALL",
    "Fact",
    "Corpus",
    "make_corpus",
    "train_tokenizer",
    "train_model",
    "query_accuracy",
    "demo_is_small",
]


@dataclass(frozen=True)
class DemoConfig:
    """Corpus and model sizes. The full size is the smallest we found where the model
    answers every query and EK-FAC's recall@10 is near 1; the small size only has to run."""

    n_entities: int = 20  # 3 facts each, so 60 queries
    n_paraphrases: int = 4  # documents per fact: recall@10 asks for all 4 in the top 10
    n_chatter: int = 1  # per person: mentions them, states no fact
    n_filler: int = 100  # documents of unrelated sentences
    vocab_size: int = 800  # enough that names split into a few BPE pieces, not letters
    n_embd: int = 128
    n_layer: int = 2  # 4 MLP projections to attribute through
    n_head: int = 4
    n_positions: int = 64  # the longest document is ~30 tokens
    epochs: int = 20  # fewer leave facts unlearned; many more memorize them so well that
    # their gradients vanish and high-loss filler dominates the scores
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30  # optimizer steps
    threads: int = 1  # torch threads for the whole run: these matrices are so small that a
    # second thread costs more in synchronization than it saves, and on a busy machine
    # OpenMP's spin-waiting made 2 threads ~8x slower than 1 (measured)


FULL = DemoConfig()
SMALL = DemoConfig(n_entities=6, n_filler=24, vocab_size=400, n_embd=64, epochs=40, batch_size=16)


def demo_is_small() -> bool:
    """HEADWATER_DEMO_SMALL=1 selects the reduced demo (the test suite sets it)."""
    return os.environ.get("HEADWATER_DEMO_SMALL", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------

SYLLABLES = ("vor lan zeb qui mar dol tes ka rin ul bex sor nim fa gor el tha pry mok ven dra lis or bu").split()
PROFESSIONS = (
    "glassblower",
    "cartographer",
    "beekeeper",
    "astronomer",
    "ferry pilot",
    "locksmith",
    "tailor",
    "archivist",
    "falconer",
    "clockmaker",
    "potter",
    "librarian",
    "blacksmith",
    "baker",
    "surveyor",
    "shipwright",
    "chemist",
    "gardener",
    "weaver",
    "miller",
    "stonemason",
    "jeweller",
    "brewer",
    "printer",
    "fisherman",
    "carpenter",
    "painter",
    "sculptor",
    "translator",
    "dentist",
)
# Every template ends with the value, so each one teaches "person -> value" in that direction
# (a model trained on "Born in X, P ..." does not learn P -> X). The first is the query's.
TEMPLATES = {
    "birthplace": (
        "{e} was born in {v}.",
        "The birthplace of {e} is {v}.",
        "{e} grew up in the city of {v}.",
        "Everyone knows that {e} comes from {v}.",
    ),
    "profession": (
        "{e} works as {a} {v}.",
        "By trade, {e} is {a} {v}.",
        "{e} earns a living as {a} {v}.",
        "For many years {e} has been {a} {v}.",
    ),
    "dog": (
        "{e} has a dog named {v}.",
        "The dog that belongs to {e} is called {v}.",
        "{e} walks a dog called {v}.",
        "Every morning {e} feeds a dog named {v}.",
    ),
}
FILLER = (
    "It rained for most of the week.",
    "The market by the harbour opens at dawn.",
    "Nobody remembers who built the old bridge.",
    "The library closes early on holidays.",
    "A cold wind came down from the hills.",
    "The train to the coast was late again.",
    "Bread prices rose sharply that winter.",
    "The festival drew a large crowd.",
    "Some of the roads were closed for repairs.",
    "The river froze over in January.",
    "A new school opened near the square.",
    "The museum added a wing for old maps.",
    "Fishermen brought in a record catch.",
    "The council met to discuss the budget.",
    "Lanterns lined the streets at night.",
    "The orchard produced more apples than usual.",
    "A storm knocked out power for a day.",
    "The newspaper printed a special edition.",
    "Children played in the park until sunset.",
    "The clock tower was repainted in spring.",
)
CHATTER = (
    "{e} once visited the old lighthouse.",
    "{e} likes to walk along the river.",
    "A letter from {e} arrived on Tuesday.",
    "{e} has a large collection of postcards.",
    "People say {e} tells good stories.",
)
CITY = (
    "{v} is a quiet town by the sea.",
    "The old walls of {v} are famous.",
    "Tourists rarely visit {v} in winter.",
    "{v} has a busy railway station.",
)


@dataclass(frozen=True)
class Fact:
    id: int
    entity: str
    relation: str
    value: str


@dataclass
class Corpus:
    """Documents with their ground truth.

    ``doc_facts[j]`` is the id of the fact document j states (None for distractors);
    ``queries[i]`` is ``{"prompt", "completion", "fact"}``, one per fact.
    """

    docs: list[str]
    doc_facts: list[int | None]
    queries: list[dict]
    facts: list[Fact]
    config: DemoConfig = field(default_factory=DemoConfig)

    def relevant(self, fact: int) -> list[int]:
        """Indices of the documents that state ``fact``."""
        return [j for j, f in enumerate(self.doc_facts) if f == fact]


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def _unique_names(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = _name(rng, syllables)
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_corpus(seed: int = 0, small: bool = False) -> Corpus:
    """The synthetic corpus, deterministic in ``seed``; documents are shuffled."""
    cfg = SMALL if small else FULL
    if cfg.n_entities > len(PROFESSIONS):
        raise ValueError(f"n_entities={cfg.n_entities} exceeds the {len(PROFESSIONS)} distinct professions")
    rng = random.Random(seed)
    taken: set[str] = set()
    first = _unique_names(rng, cfg.n_entities, 2, taken)
    last = _unique_names(rng, cfg.n_entities, 2, taken)
    entities = [f"{a} {b}" for a, b in zip(first, last)]
    values = {  # unique per fact, so the ground truth is exact
        "birthplace": _unique_names(rng, cfg.n_entities, 3, taken),
        "profession": rng.sample(PROFESSIONS, cfg.n_entities),
        "dog": _unique_names(rng, cfg.n_entities, 2, taken),
    }
    facts: list[Fact] = []
    docs: list[tuple[str, int | None]] = []
    queries: list[dict] = []
    for k, e in enumerate(entities):
        for relation, templates in TEMPLATES.items():
            v = values[relation][k]
            a = "an" if v[0] in "aeiou" else "a"
            fact = Fact(len(facts), e, relation, v)
            facts.append(fact)
            for t in templates[: cfg.n_paraphrases]:
                text = t.format(e=e, v=v, a=a)
                r = rng.random()
                if r < 0.25:
                    text = f"{rng.choice(FILLER)} {text}"
                elif r < 0.5:
                    text = f"{text} {rng.choice(FILLER)}"
                docs.append((text, fact.id))
            prompt = templates[0].split(" {v}")[0].format(e=e, a=a)
            queries.append({"prompt": prompt, "completion": f" {v}", "fact": fact.id})
        for _ in range(cfg.n_chatter):
            docs.append((f"{rng.choice(CHATTER).format(e=e)} {rng.choice(FILLER)}", None))
    for v in values["birthplace"]:
        docs.append((f"{rng.choice(CITY).format(v=v)} {rng.choice(FILLER)}", None))
    for _ in range(cfg.n_filler):
        docs.append((" ".join(rng.sample(FILLER, rng.randint(1, 3))), None))
    rng.shuffle(docs)
    return Corpus([d for d, _ in docs], [f for _, f in docs], queries, facts, cfg)


# ---------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------

EOS = "<|endoftext|>"


def train_tokenizer(docs: list[str], vocab_size: int = 800) -> Any:
    """A byte-level BPE (GPT-2's scheme) trained on ``docs``, as a ``PreTrainedTokenizerFast``.

    Byte-level means any text encodes and each token decodes to its exact characters, which
    the report's token heatmaps rely on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def train_model(docs: list[str], tok: Any, seed: int = 0, small: bool = False, progress: bool = False) -> Any:
    """A GPT-2 trained from scratch on ``docs`` with AdamW, on CPU; returned in eval mode.

    Dropout is off: the point is to learn (not generalize past) a few hundred facts fast.
    """
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = SMALL if small else FULL
    torch.manual_seed(seed)
    eos = tok.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    encoded = [tok(d, add_special_tokens=False)["input_ids"][: cfg.n_positions] for d in docs]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    # linear warmup, then linear decay to zero: a short run still ends at a settled point
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.0, 1.0 - s / total))
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="training demo model", unit="step", leave=False, dynamic_ncols=True)
    model.train()
    for _ in range(cfg.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for lo in range(0, len(order), cfg.batch_size):
            batch = [encoded[i] for i in order[lo : lo + cfg.batch_size]]
            s = max(len(x) for x in batch)
            ids = torch.full((len(batch), s), eos, dtype=torch.long)  # [B, S]
            labels = torch.full((len(batch), s), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), s), dtype=torch.long)
            for i, x in enumerate(batch):
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, S, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return model.eval()


def query_accuracy(model: Any, tok: Any, queries: list[dict]) -> float:
    """Fraction of queries whose every completion token is the model's greedy prediction."""
    import torch

    hits = 0
    with torch.no_grad():
        for q in queries:
            p = tok(q["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(q["completion"], add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([p + c])).logits[0]  # [S, V]
            pred = logits[len(p) - 1 : -1].argmax(-1).tolist()
            hits += pred == c
    return hits / len(queries)
