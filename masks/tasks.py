"""Offline synthetic long-context tasks: a document with needles hidden in filler, a question, answers.

Four tasks, after RULER's and LeanK's:
- `passkey`: a 5-digit pass key hidden once in the filler;
- `multikey`: UUID-like key -> value needles, one asked about, the others distractors (4 keys in all,
  as RULER's niah_multikey_1);
- `multivalue`: one key with four 7-digit values scattered through the document; all four are asked for;
- `vartrack`: chains of assignments (`VAR QXJBT = 12345.`, `VAR PLMNO = VAR QXJBT.`, ...), a target chain
  and distractor chains; the question asks which variables hold the target chain's value.

The filler ("haystack") is made offline: `faker` is varied prose from the `faker` package (people, jobs,
companies and streets; no digits, so nothing looks like an answer), `repeat` the classic passkey filler
of simple sentences in varied order. Faker's lorem words are not used: word salad makes small models
lose track of the instruction (SmolLM2-135M-Instruct then misses even a 200-token passkey).

Lengths are in the model's own tokens: `length` is the whole prompt (`context_ids + question_ids`), hit
to within half a filler sentence. `depth` (0 = start of the document, 1 = end) places the asked-for
needle; other needles fall at depths drawn from the sample's seed.

Splits: `split="eval"` and `split="train"` draw from disjoint seed ranges and disjoint phrasing
templates, so held-out evaluation prompts share neither seeds nor wording with training prompts.

A `Sample` carries the texts and the token ids, wrapped in the model's chat template: `context_ids` is
the chat prefix, the instruction and the document; `question_ids` the question, the end of the user
turn, the assistant header and the first words of the reply (`answer_prefix`), so an instruct model
continues with the answer; `answer_ids` the expected continuation, ending with the end-of-turn token.
"""
from __future__ import annotations

import functools
import random
import string
import uuid
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from leank.errors import LeankError

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
SPLITS = ("eval", "train")
HAYSTACKS = ("faker", "repeat")

# Sample seeds: eval in [0, SEED_SPAN), train in [SEED_SPAN, 2 * SEED_SPAN).
SEED_SPAN = 1 << 30
_MARK = "\x00LEANK-DOCUMENT\x00"  # stands for the document while the chat template is rendered


@dataclass(frozen=True)
class Template:
    """The wording of one task. Fields are `str.format` patterns (see each task for its fields)."""

    name: str
    intro: str  # the instruction before the document
    needle: str  # one needle sentence
    question: str  # after the document
    answer_prefix: str  # the reply's first words, fed with the question
    answer: str  # the expected continuation of the reply
    link: str = ""  # vartrack: a copy assignment


TEMPLATES: dict[str, dict[str, tuple[Template, ...]]] = {
    "passkey": {
        "eval": (
            Template("passkey-e0",
                     "There is an important piece of information hidden inside a lot of irrelevant text. "
                     "Find it and memorize it. I will quiz you about it.",
                     "The pass key is {key}. Remember it. {key} is the pass key.",
                     "What is the pass key mentioned in the text above? Answer with the 5-digit number only.",
                     "The pass key is", " {key}."),
        ),
        "train": (
            Template("passkey-t0",
                     "A secret number is buried somewhere in the text below. Keep it in mind; you will be asked for it.",
                     "The secret number is {key}. Do not forget it: {key}.",
                     "Which secret number was buried in the text? Reply with just the number.", "The secret number is",
                     " {key}."),
            Template("passkey-t1",
                     "Read the following document carefully. One sentence gives an access code.",
                     "Note well: the access code is {key}.",
                     "Which access code does the document give? Give only the code.", "The access code is", " {key}."),
        ),
    },
    "multikey": {
        "eval": (
            Template("multikey-e0",
                     "Some special magic uuids are hidden within the following text. Make sure to memorize them. "
                     "I will quiz you about the uuids afterwards.",
                     "One of the special magic uuids for {key} is: {value}.",
                     "What is the special magic uuid for {key} mentioned in the provided text? Answer with the uuid only.",
                     "The special magic uuid for {key} mentioned in the provided text is", " {value}."),
        ),
        "train": (
            Template("multikey-t0",
                     "The text below contains several identifiers, each paired with a code. Remember the pairs.",
                     "The code paired with identifier {key} is {value}.",
                     "Which code is paired with identifier {key}? Reply with the code alone.", "The code paired with identifier {key} is",
                     " {value}."),
            Template("multikey-t1",
                     "Hidden in this document are records that map one label to another. You will be asked about one.",
                     "Record: label {key} maps to {value}.",
                     "According to the records, what does label {key} map to? Only give the label it maps to.", "Label {key} maps to", " {value}."),
        ),
    },
    "multivalue": {
        "eval": (
            Template("multivalue-e0",
                     "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                     "I will quiz you about the numbers afterwards.",
                     "One of the special magic numbers for {key} is: {value}.",
                     "What are all the special magic numbers for {key} mentioned in the provided text? Answer with the numbers only.",
                     "The special magic numbers for {key} mentioned in the provided text are", " {values}."),
        ),
        "train": (
            Template("multivalue-t0",
                     "Several numbers in the following text belong to the same name. Collect all of them.",
                     "A number that belongs to {key} is {value}.",
                     "List every number that belongs to {key}, and nothing else.", "The numbers that belong to {key} are",
                     " {values}."),
            Template("multivalue-t1",
                     "Read the notes below; some of them record values for a single entry.",
                     "Note: entry {key} has the value {value}.",
                     "Which values does entry {key} have? Just list them.", "Entry {key} has the values", " {values}."),
        ),
    },
    "vartrack": {
        "eval": (
            Template("vartrack-e0",
                     "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                     "VAR {name} = {value}.",
                     "Find all variables that are assigned the value {value} in the text above. Answer with the variable names only.",
                     "According to the chain(s) of variable assignment in the text above, {count} variables are "
                     "assigned the value {value}, they are:", " {names}.",
                     link="VAR {name} = VAR {prev}."),
        ),
        "train": (
            Template("vartrack-t0",
                     "The text below hides assignments between variables. Follow every chain.",
                     "Let {name} be {value}.",
                     "Which variables end up holding {value}? Only list their names.", "The {count} variables holding {value} are",
                     " {names}.", link="Let {name} be {prev}."),
            Template("vartrack-t1",
                     "Keep track of the variables defined in the document below.",
                     "Set {name} to {value}.",
                     "Name every variable whose value is {value}, nothing more.", "The variables whose value is {value} are",
                     " {names}.", link="Set {name} to the value of {prev}."),
        ),
    },
}


@dataclass
class Sample:
    """One prompt of a task, as text and as the model's tokens (see the module docstring)."""

    task: str
    split: str
    seed: int  # the sample's own seed (in its split's range)
    template: str
    haystack: str
    length: int  # requested prompt tokens
    depth: float  # requested depth of the asked-for needle
    context: str  # the document (filler and needles)
    question: str
    answer_prefix: str
    answer: str  # the expected continuation after answer_prefix
    answers: list[str]  # the strings a reply must contain
    context_ids: list[int]
    question_ids: list[int]
    answer_ids: list[int]
    needle_depths: list[float] = field(default_factory=list)  # where each needle landed, in document tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    @property
    def prompt_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    def describe(self) -> dict:
        """Everything but the token ids and the document (for JSON reports)."""
        return {"task": self.task, "split": self.split, "seed": self.seed, "template": self.template,
                "haystack": self.haystack, "length": self.length, "prompt_tokens": self.prompt_tokens,
                "depth": self.depth, "needle_depths": [round(d, 4) for d in self.needle_depths],
                "question": self.question, "answers": self.answers}


def sample_seed(split: str, seed: int, index: int) -> int:
    """The seed of sample `index` of run `seed` in `split`; the splits' ranges are disjoint."""
    if split not in SPLITS:
        raise LeankError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLITS.index(split) * SEED_SPAN + (seed * 1_000_003 + index) % SEED_SPAN


# --- filler -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _faker_words() -> dict[str, tuple[str, ...]]:
    """Pools of names, places, jobs and phrases from `faker` (fixed seed), made once per process.

    Sentences are composed from these pools with each sample's own random generator: calling faker for
    every sentence would cost most of a second per 7K-token haystack.
    """
    from faker import Faker  # optional (extra `train`): only the faker haystack needs it

    fake = Faker("en_US")
    fake.seed_instance(20250807)
    n = 400

    def pool(fn, lower=False):
        return tuple(dict.fromkeys((fn().lower() if lower else fn()) for _ in range(n)))

    return {"name": pool(fake.name), "first": pool(fake.first_name), "city": pool(fake.city),
            "job": pool(fake.job, True), "company": pool(fake.company), "phrase": pool(fake.catch_phrase, True),
            "bs": pool(fake.bs), "country": pool(fake.country), "street": pool(fake.street_name),
            "color": pool(fake.color_name, True), "day": pool(fake.day_of_week), "month": pool(fake.month_name)}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _faker_sentence(w: dict, rng: random.Random) -> str:
    def pick(kind: str) -> str:
        return rng.choice(w[kind])

    kind = rng.randrange(6)
    if kind == 0:
        job = pick("job")
        return f"{pick('name')} works as {_article(job)} {job} in {pick('city')}."
    if kind == 1:
        return f"The company {pick('company')} is known for its {pick('phrase')}."
    if kind == 2:
        return f"{pick('first')} likes to {pick('bs')} on {pick('day')}s."
    if kind == 3:
        return f"In {pick('city')}, the {pick('color')} house on {pick('street')} belongs to {pick('name')}."
    if kind == 4:
        return f"Every {pick('month')}, {pick('first')} travels from {pick('country')} to visit {pick('first')}."
    return f"{pick('company')} hired {pick('name')} to {pick('bs')}."


_SIMPLE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
           "The river runs to the sea.", "Birds sing in the morning.", "The road winds through the hills.",
           "Clouds drift over the town.", "The night is quiet.", "Leaves fall in autumn.", "The wind is cold.")


def _filler(kind: str, rng: random.Random) -> Iterator[str]:
    if kind == "faker":
        words = _faker_words()
        while True:
            yield _faker_sentence(words, rng)
    elif kind == "repeat":
        while True:
            yield rng.choice(_SIMPLE)
    else:
        raise LeankError(f"haystack must be one of {', '.join(HAYSTACKS)}, got {kind!r}")


# --- tasks: needles (text, depth), question/answer fields, answers --------------------------------------
def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _spread(rng: random.Random, n: int, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    return sorted(rng.uniform(lo, hi) for _ in range(n))


def _passkey(rng, tpl, depth, opts):
    key = str(rng.randint(10000, 99999))
    return [(tpl.needle.format(key=key), depth)], {"key": key}, [key]


def _multikey(rng, tpl, depth, opts):
    n = opts.get("keys", 4)
    keys = [_uuid(rng) for _ in range(n)]
    values = [_uuid(rng) for _ in range(n)]
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    needles = [(tpl.needle.format(key=k, value=v), d) for k, v, d in zip(keys, values, depths)]
    return needles, {"key": keys[0], "value": values[0]}, [values[0]]


def _multivalue(rng, tpl, depth, opts):
    n = opts.get("values", 4)
    key = _uuid(rng)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    needles = [(tpl.needle.format(key=key, value=v), d) for v, d in zip(values, depths)]
    ordered = [v for _, v in sorted(zip(depths, values))]  # as they appear in the document
    return needles, {"key": key, "values": ", ".join(ordered)}, values


def _vartrack(rng, tpl, depth, opts):
    hops, chains = opts.get("hops", 4), opts.get("chains", 2)
    names: list[str] = []  # a list, not a set: a set's order changes with the process's hash seed
    while len(names) < (hops + 1) * chains:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    values = [str(v) for v in rng.sample(range(10000, 100000), chains)]
    needles, target = [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        # the target chain starts at `depth` and runs on after it; distractor chains anywhere, in order
        depths = [depth] + _spread(rng, hops, depth, 1.0) if c == 0 else _spread(rng, hops + 1)
        for i, (name, d) in enumerate(zip(chain, depths)):
            text = tpl.needle.format(name=name, value=values[c]) if i == 0 else tpl.link.format(name=name, prev=chain[i - 1])
            needles.append((text, d))
        if c == 0:
            target = chain
    return needles, {"value": values[0], "count": hops + 1, "names": ", ".join(target)}, target


_BUILDERS = {"passkey": _passkey, "multikey": _multikey, "multivalue": _multivalue, "vartrack": _vartrack}


# --- assembling a sample --------------------------------------------------------------------------------
def _chat_parts(model, intro: str, question: str) -> tuple[str, str]:
    """The rendered chat prompt before and after the document (user turn: intro, document, question)."""
    text = model.apply_chat_template([{"role": "user", "content": f"{intro}\n\n{_MARK}\n\n{question}"}])
    if text.count(_MARK) != 1:
        raise LeankError("the chat template does not keep the user's message as it is")
    before, after = text.split(_MARK)
    return before, after


def _turn_end_ids(model) -> list[int]:
    """The end-of-turn token(s) the template puts after an assistant reply (end-of-generation ids only)."""
    text = model.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}],
                                     add_generation_prompt=False)
    tail = text.split(_MARK)[-1] if _MARK in text else ""
    ids = model.tokenize(tail, add_special=False, parse_special=True)
    eog = model.tokenizer.eog_ids
    end = []
    for t in ids:
        if t not in eog:
            break
        end.append(t)
    return end or ([model.tokenizer.eos_id] if model.tokenizer.eos_id >= 0 else [])


def _bos(model) -> list[int]:
    tok = model.tokenizer
    return [tok.bos_id] if tok.add_bos and tok.bos_id >= 0 else []


def make_sample(model, task: str, length: int, depth: float = 0.5, *, seed: int = 0, index: int = 0,
                split: str = "eval", haystack: str = "faker", template: Template | None = None,
                **options) -> Sample:
    """Sample `index` of `task` for `model`, `length` prompt tokens, the asked-for needle at `depth`.

    `seed` and `index` pick the sample's seed within `split`'s range (see `sample_seed`); `template`
    overrides the split's wording (drawn from `TEMPLATES[task][split]` otherwise). Task options: `keys`
    (multikey, 4), `values` (multivalue, 4), `hops` and `chains` (vartrack, 4 and 2). The same arguments
    always give the same sample.
    """
    if task not in _BUILDERS:
        raise LeankError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise LeankError(f"depth must be within [0, 1], got {depth}")
    if length > model.args.context_length:
        raise LeankError(f"length {length} exceeds the model's context of {model.args.context_length} tokens")
    s = sample_seed(split, seed, index)
    rng = random.Random(s)
    tpl = template or rng.choice(TEMPLATES[task][split])
    needles, fields, answers = _BUILDERS[task](rng, tpl, depth, options)
    question = tpl.question.format(**fields)
    answer_prefix = tpl.answer_prefix.format(**fields)
    answer = tpl.answer.format(**fields)
    intro = tpl.intro

    def ids(text: str) -> list[int]:
        return model.tokenize(text, add_special=False)

    before, after = _chat_parts(model, intro, question)
    head_ids = _bos(model) + model.tokenize(before, add_special=False, parse_special=True)
    tail_ids = model.tokenize(after, add_special=False, parse_special=True) + ids(answer_prefix)
    needle_ids = [ids(" " + t) for t, _ in needles]
    budget = length - len(head_ids) - len(tail_ids) - sum(map(len, needle_ids))
    if budget < 0:
        raise LeankError(f"{task}: {length} tokens is too short; its instruction, needles and question alone take "
                         f"{length - budget}")

    # filler sentences until the budget is met, keeping the count closest to it
    sentences, filler_ids, ends = [], [], []
    total = 0
    for sentence in _filler(haystack, rng):
        if total >= budget:
            break
        sentences.append(sentence)
        filler_ids.append(ids(" " + sentence))
        total += len(filler_ids[-1])
        ends.append(total)
    if sentences and total - budget > budget - (ends[-2] if len(ends) > 1 else 0):
        for lst in (sentences, filler_ids, ends):
            lst.pop()
    # each needle goes to the sentence boundary nearest its depth in the finished document (filler and
    # needles), taken in depth order so that the needles before it count; ties keep the needles' order
    slots: dict[int, list[int]] = {}
    filler_tokens = ends[-1] if ends else 0
    doc_tokens = filler_tokens + sum(map(len, needle_ids))
    placed, last = 0, -1
    for k in sorted(range(len(needles)), key=lambda k: needles[k][1]):
        target = min(max(needles[k][1] * doc_tokens - placed, 0), filler_tokens)
        i = bisect_left(ends, target)
        cut = min((j for j in (i - 1, i) if last <= j < len(ends)), default=last,
                  key=lambda j: abs((ends[j] if j >= 0 else 0) - target))
        slots.setdefault(cut + 1, []).append(k)
        placed, last = placed + len(needle_ids[k]), cut
    # the document and its tokens, piece by piece: pre-tokenization splits at the spaces between
    # sentences, so the pieces' tokens are the document's tokens (one tokenizer pass, not two)
    pieces, piece_ids, starts = [], [], [0] * len(needles)
    for i in range(len(sentences) + 1):
        for k in slots.get(i, []):
            starts[k] = len(pieces)
            pieces.append(needles[k][0])
            piece_ids.append(needle_ids[k])
        if i < len(sentences):
            pieces.append(sentences[i])
            piece_ids.append(filler_ids[i])
    if pieces:
        piece_ids[0] = ids(pieces[0])  # the document starts a line: no space before its first word
    offsets = [0]
    for p in piece_ids:
        offsets.append(offsets[-1] + len(p))
    depths = [offsets[starts[k]] / max(offsets[-1], 1) for k in range(len(needles))]
    document = " ".join(pieces)
    # the chat prefix and the first piece together: "\n\n" before a word tokenizes apart from "\n\n" at an end
    first = _bos(model) + model.tokenize(before + pieces[0], add_special=False, parse_special=True) if pieces else head_ids
    context_ids = first + [t for p in piece_ids[1:] for t in p]
    answer_ids = model.tokenize(answer, add_special=False) + _turn_end_ids(model)
    return Sample(task=task, split=split, seed=s, template=tpl.name, haystack=haystack, length=length, depth=depth,
                  context=document, question=question, answer_prefix=answer_prefix, answer=answer.strip(),
                  answers=answers, context_ids=context_ids, question_ids=tail_ids, answer_ids=answer_ids,
                  needle_depths=depths)


def make_samples(model, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int = 1, *,
                 seed: int = 0, split: str = "eval", haystack: str = "faker") -> Iterator[Sample]:
    """Every (task, length, depth) combination, `samples` of each; sample indices never repeat in a run."""
    index = 0
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for _ in range(samples):
                    yield make_sample(model, task, length, depth, seed=seed, index=index, split=split,
                                      haystack=haystack)
                    index += 1


def random_samples(model, tasks: Sequence[str], min_length: int, max_length: int, *, seed: int = 0,
                   split: str = "train", haystack: str = "faker", **options) -> Iterator[Sample]:
    """An endless stream for training: tasks in turn, lengths uniform in [min_length, max_length], depths
    uniform in [0, 1], every sample with its own index (so its own seed within `split`)."""
    if not tasks:
        raise LeankError("no task to sample from")
    if not 0 < min_length <= max_length:
        raise LeankError(f"need 0 < min_length <= max_length, got {min_length} and {max_length}")
    draw = random.Random(sample_seed(split, seed, 0) ^ 0x5EED)
    index = 0
    while True:
        task = tasks[index % len(tasks)]
        yield make_sample(model, task, draw.randint(min_length, max_length), draw.random(), seed=seed, index=index,
                          split=split, haystack=haystack, **options)
        index += 1
