"""Builders of the six generated task families, RULER/LongBench style, from one split's real text.

Each builder takes the split's text pool, a random generator and a target context size in characters,
and returns one `Sample`; which needles, names and numbers a split may use is fixed by the split.
"""

from __future__ import annotations

import io
import random
import re
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field

from rapidfuzz import fuzz, process

from polykv_search.data.sample import Sample
from polykv_search.data.sources import Document, Split, line_owners, split_sentences
from polykv_search.errors import DataError

# Rough characters per SmolLM2 token, measured on these sources; used only to size contexts.
CHARS_PER_TOKEN = {"prose": 4.5, "code": 4.0, "fewshot": 3.4}

# Needle keys are adjective-noun pairs; each split draws from its own third of each list.
_ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "witty", "young", "zesty", "ancient", "bitter", "crimson", "daring", "elegant", "fierce", "golden",
               "hasty", "idle", "jagged", "kind", "lively", "misty", "nimble", "orange", "polite", "rusty",
               "sturdy", "tender", "urban", "velvet", "wild", "yellow", "bold", "clever")
_NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tiger",
          "umbrella", "violin", "walrus", "yacht", "zebra", "bridge", "canyon", "desert", "forest", "glacier",
          "hammer", "igloo", "jungle", "kitten", "ladder", "mirror", "nugget", "otter", "pillow", "rocket",
          "spider", "tunnel", "valley", "window", "beacon", "castle", "feather", "goblet", "helmet", "marble")
# Key words of the long split only (none is in the lists above).
_LONG_ADJECTIVES = ("azure", "breezy", "cosmic", "dapper", "frosty", "glossy", "humble", "ivory", "jovial", "lunar",
                    "mossy", "quirky", "rosy", "snowy", "sunny", "thorny")
_LONG_NOUNS = ("acorn", "bucket", "comet", "dolphin", "ember", "fiddle", "gazebo", "hornet", "iceberg", "jigsaw",
               "koala", "lobster", "mango", "nebula", "pebble", "robin")
# Key words of the long calibration split only (in none of the lists above).
_CALIB_LONG_ADJECTIVES = ("bumpy", "chalky", "dainty", "fluffy", "gloomy", "hearty", "inky", "jumpy", "leafy",
                          "murky", "nutty", "peppy", "rugged", "silky", "spiky", "woolly")
_CALIB_LONG_NOUNS = ("anvil", "barrel", "cactus", "dagger", "easel", "funnel", "geyser", "hatchet", "inkwell",
                     "kayak", "ladle", "mitten", "napkin", "oyster", "parrot", "quiver")
# First digit of every number and first letter of every variable name, per split: no needle is shared. The long
# split has no digit or letter left; its numbers are longer instead (7 digits, RULER's needle length, against 5-6
# elsewhere) and so are its variable names (6 letters against 5), so none of its needles equals another split's.
# The long calibration split's numbers have 8 digits and its names 7 letters, so none equals another split's.
_DIGITS: dict[Split, str] = {"calib": "123", "eval": "456", "eval_alt": "789", "long": "123456789",
                             "calib_long": "123456789"}
_LETTERS: dict[Split, str] = {"calib": "ABCDEFGH", "eval": "IJKLMNOPQ", "eval_alt": "RSTUVWXYZ",
                              "long": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "calib_long": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
_NUMBER_DIGITS: dict[Split, int] = {"long": 7, "calib_long": 8}  # else the family's own
_NAME_LETTERS: dict[Split, int] = {"long": 6, "calib_long": 7}  # else 5 (RULER's)
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Statement kinds for few-shot classification: a regex on the stripped source line, and its label.
STATEMENT_KINDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(import|from)\s+[\w.]+"), "import"),
    (re.compile(r"^(async\s+)?def\s+\w+"), "function"),
    (re.compile(r"^class\s+\w+"), "class"),
    (re.compile(r"^return\b"), "return"),
    (re.compile(r"^raise\b"), "raise"),
    (re.compile(r"^(if|elif)\b.*:$"), "condition"),
    (re.compile(r"^(for|while)\b.*:$"), "loop"),
    (re.compile(r"^[\w.]+(\[[^\]]*\])?\s*=[^=]"), "assignment"),
)
STATEMENT_LABELS = tuple(sorted({label for _, label in STATEMENT_KINDS}))


@dataclass
class SplitPool:
    """The text one split may use, and a cursor so prose windows are not reused before the pool runs out."""

    split: Split
    paragraphs: list[str]
    code_docs: list[Document]
    lines_by_label: dict[str, list[str]]
    cursor: int = 0
    used_files: set[str] = field(default_factory=set)

    def take_paragraphs(self, chars: int) -> list[str]:
        """The next run of paragraphs holding about `chars` characters (wraps around when the pool is spent)."""
        out: list[str] = []
        size = 0
        while size < chars:
            out.append(self.paragraphs[self.cursor % len(self.paragraphs)])
            size += len(out[-1]) + 2
            self.cursor += 1
        return out

    def next_paragraph(self) -> str:
        paragraph = self.paragraphs[self.cursor % len(self.paragraphs)]
        self.cursor += 1
        return paragraph


def make_pool(split: Split, documents: list[Document], rng: random.Random) -> SplitPool:
    """Shuffle the split's documents (paragraph order inside each is kept) and index its code lines by kind."""
    docs = list(documents)
    rng.shuffle(docs)
    paragraphs = [p for doc in docs for p in doc.paragraphs]
    code_docs = sorted((doc for doc in docs if doc.code), key=lambda d: d.id)
    lines_by_label: dict[str, list[str]] = {label: [] for label in STATEMENT_LABELS}
    owners = line_owners()  # every line of the hashed splits' files; the long split's own lines are absent
    seen: set[str] = set()
    for doc in code_docs:
        for line in doc.code.splitlines():
            text = line.strip()
            label = statement_kind(text)
            if label and text not in seen and owners.get(text, "long") == split:
                seen.add(text)
                lines_by_label[label].append(text)
    return SplitPool(split=split, paragraphs=paragraphs, code_docs=code_docs, lines_by_label=lines_by_label)


def statement_kind(line: str) -> str | None:
    """The label of a source line for few-shot classification, or None when it is not a clear example."""
    text = line.strip()
    if not 12 <= len(text) <= 90 or text.startswith("#") or "\t" in text:
        return None
    for pattern, label in STATEMENT_KINDS:
        if pattern.match(text):
            return label
    return None


def _number(rng: random.Random, split: Split, digits: int) -> str:
    digits = _NUMBER_DIGITS.get(split, digits)
    return rng.choice(_DIGITS[split]) + "".join(rng.choice("0123456789") for _ in range(digits - 1))


def _variable(rng: random.Random, split: Split) -> str:
    return rng.choice(_LETTERS[split]) + "".join(rng.choice(_UPPER) for _ in range(_NAME_LETTERS.get(split, 5) - 1))


def _keys(rng: random.Random, split: Split, count: int) -> list[str]:
    if split == "long":
        adjectives, nouns = list(_LONG_ADJECTIVES), list(_LONG_NOUNS)
    elif split == "calib_long":
        adjectives, nouns = list(_CALIB_LONG_ADJECTIVES), list(_CALIB_LONG_NOUNS)
    else:
        part = {"calib": 0, "eval": 1, "eval_alt": 2}[split]
        adjectives = [w for i, w in enumerate(_ADJECTIVES) if i % 3 == part]
        nouns = [w for i, w in enumerate(_NOUNS) if i % 3 == part]
    return [f"{a}-{n}" for a, n in zip(rng.sample(adjectives, count), rng.sample(nouns, count))]


def _insert_in_sentences(paragraphs: list[str], needles: list[str], rng: random.Random) -> str:
    """Insert each needle sentence at a random sentence boundary of a random paragraph (uniform depth)."""
    units = [split_sentences(p) for p in paragraphs]
    slots = [(i, j) for i, sentences in enumerate(units) for j in range(len(sentences) + 1)]
    for needle, (i, j) in zip(needles, sorted(rng.sample(slots, len(needles)), reverse=True)):
        units[i].insert(j, needle)
    return "\n\n".join(" ".join(sentences) for sentences in units)


def _words(text: str) -> int:
    return len(text.split())


def niah_single(pool: SplitPool, rng: random.Random, *, chars: int, index: int) -> Sample:
    """One "special magic number" sentence hidden at a random sentence boundary of real prose."""
    key = _keys(rng, pool.split, 1)[0]
    value = _number(rng, pool.split, 6)
    context = _insert_in_sentences(pool.take_paragraphs(chars),
                                   [f"The special magic number for {key} is: {value}."], rng)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    return _sample(pool, "niah_single", index, context, question, (value,))


def niah_multikey(pool: SplitPool, rng: random.Random, *, chars: int, index: int, keys: int = 2) -> Sample:
    """Several key -> number needles; the question asks for one key, the others are distractors.

    Two keys by default: with three, SmolLM2-135M picked a distractor's number most of the time (measured
    0.40 on eval, chance 0.33); with two it scored 0.70.
    """
    names = _keys(rng, pool.split, keys)
    values = [_number(rng, pool.split, 6) for _ in names]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(names, values)]
    context = _insert_in_sentences(pool.take_paragraphs(chars), needles, rng)
    target = rng.randrange(keys)
    question = f"What is the special magic number for {names[target]} mentioned in the provided text?"
    return _sample(pool, "niah_multikey", index, context, question, (values[target],))


def variable_tracking(pool: SplitPool, rng: random.Random, *, chars: int, index: int, hops: int = 1) -> Sample:
    """A chain VAR A = 12345, VAR B = VAR A, ... spread in order over prose; ask every variable holding 12345.

    One hop by default (RULER's vt with one chain): SmolLM2-135M finds the variable holding the number but
    rarely follows a second hop (measured: 0.65 with one hop, about 0.35 with two, at 1.2k-3.5k tokens).
    """
    names: list[str] = []
    while len(names) < hops + 1:
        name = _variable(rng, pool.split)
        if name not in names:
            names.append(name)
    value = _number(rng, pool.split, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    paragraphs = pool.take_paragraphs(chars)
    positions = sorted(rng.sample(range(len(paragraphs) + 1), len(chain)))
    for offset, (position, statement) in enumerate(zip(positions, chain)):
        paragraphs.insert(position + offset, statement)
    question = f"Find all variables that hold the value {value} in the text above."
    return _sample(pool, "variable_tracking", index, "\n\n".join(paragraphs), question, tuple(names))


def prose_continuation(pool: SplitPool, rng: random.Random, *, chars: int, index: int, given_words: int = 3,
                       min_support: float = 0.6) -> Sample:
    """Real prose cut after a sentence inside a paragraph; the answer is the rest of the next sentence.

    Only sentences whose content words mostly (`min_support`) occur in the preceding text are used, so the
    continuation is predictable from the context rather than from world knowledge.
    """
    paragraphs = pool.take_paragraphs(chars)
    while True:
        paragraph = pool.next_paragraph()
        sentences = split_sentences(paragraph)
        recent = _content_words(" ".join(paragraphs[-4:]))
        choices = []
        for j in range(1, len(sentences)):
            words = sentences[j].split()
            if not 10 <= len(words) <= 40:
                continue
            seen = _content_words(" ".join(sentences[:j])) | recent
            wanted = _content_words(" ".join(words[given_words:]))
            if wanted and len(wanted & seen) / len(wanted) >= min_support:
                choices.append(j)
        if choices:
            break
        paragraphs.append(paragraph)  # slide the window: keep the context near its target size
        while len(paragraphs) > 1 and sum(len(p) + 2 for p in paragraphs) > chars:
            paragraphs.pop(0)
    cut = rng.choice(choices)
    words = sentences[cut].split()
    begin, rest = " ".join(words[:given_words]), " ".join(words[given_words:])
    context = "\n\n".join([*paragraphs, " ".join(sentences[:cut])])
    question = f'Continue the text with its next sentence, which begins with "{begin}"'
    return _sample(pool, "prose_continuation", index, context, question, (rest,))


def _content_words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z_]{4,}", text)}


def code_completion(pool: SplitPool, rng: random.Random, *, chars: int, index: int, local_lines: int = 3,
                    min_similarity: float = 75.0, far: int = 20, slack: float = 0.15) -> Sample:
    """A stdlib file prefix; the answer is the next statement line, one resembling a line >= `far` lines back.

    The last `local_lines` lines before the answer are the question (uncompressed), the rest is the context,
    within `slack` (a share) of `chars` characters.
    """
    files = [doc for doc in pool.code_docs if len(doc.code) > chars * 1.2 and doc.id not in pool.used_files]
    rng.shuffle(files)
    for doc in files:
        lines = doc.code.splitlines(keepends=True)
        in_strings = _string_lines(doc.code)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        candidates = []
        for k in range(far + local_lines, len(lines)):
            if not chars * (1 - slack) <= starts[k] <= chars * (1 + slack) or k + 1 in in_strings:
                continue
            text = lines[k].strip()
            if not 12 <= len(text) <= 100 or text.startswith(("#", '"', "'", "@")):
                continue
            earlier = [line.strip() for line in lines[: k - far]]
            if process.extractOne(text, earlier, scorer=fuzz.ratio, score_cutoff=min_similarity) is not None:
                candidates.append(k)
        if candidates:
            pool.used_files.add(doc.id)
            k = rng.choice(candidates)
            context = "".join(lines[: k - local_lines]).rstrip("\n")
            # Both parts stop at the end of a line's text, not after its newline: SmolLM2 (like most BPE
            # tokenizers) merges a newline with the next line's indentation into one token.
            question = "\n" + "".join(lines[k - local_lines: k]).rstrip("\n")
            # The answer keeps its indentation (the metric strips it) so teacher forcing sees the real line.
            return _sample(pool, "code_completion", index, context, question, (lines[k].rstrip(),))
    raise DataError(f"no stdlib file of split {pool.split} is long enough for a {chars}-char code prefix; "
                    "lower --max-tokens (--long-tokens for the long split)")


def _string_lines(code: str) -> set[int]:
    """1-based numbers of the lines inside multi-line string literals (docstrings are not code to complete)."""
    inside: set[int] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.STRING and token.end[0] > token.start[0]:
                inside.update(range(token.start[0], token.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        pass
    return inside


def fewshot_classification(pool: SplitPool, rng: random.Random, *, chars: int, index: int,
                           repeat_share: float = 0.5) -> Sample:
    """Many "Code: <line> / Kind: <label>" examples, then one line to classify (TREC-style, 8 classes).

    With probability `repeat_share` the line to classify is one of the examples (in-context recall); otherwise
    it is a new line of the same split, so the label must be inferred from the examples.
    """
    examples: list[tuple[str, str]] = []
    size = 0
    used: set[str] = set()
    while size < chars:
        label = rng.choice(STATEMENT_LABELS)
        line = rng.choice(pool.lines_by_label[label])
        if line in used:
            continue
        used.add(line)
        examples.append((line, label))
        size += len(line) + len(label) + 15
    if rng.random() < repeat_share:
        line, label = rng.choice(examples)
    else:
        label = rng.choice(STATEMENT_LABELS)
        line = rng.choice([x for x in pool.lines_by_label[label] if x not in used])
    context = "\n\n".join(f"Code: {x}\nKind: {y}" for x, y in examples)
    return _sample(pool, "fewshot_classification", index, context, f"Code: {line}\nKind:", (label,),
                   all_classes=STATEMENT_LABELS)


def _sample(pool: SplitPool, task: str, index: int, context: str, question: str, answers: tuple[str, ...],
            all_classes: tuple[str, ...] | None = None) -> Sample:
    return Sample(id=f"{pool.split}-{task}-{index:03d}", task=task, context=context, question=question,
                  answers=answers, all_classes=all_classes, length=_words(context))


Builder = Callable[..., Sample]
FAMILIES: dict[str, tuple[Builder, str]] = {  # task -> (builder, kind of text for CHARS_PER_TOKEN)
    "niah_single": (niah_single, "prose"),
    "niah_multikey": (niah_multikey, "prose"),
    "variable_tracking": (variable_tracking, "prose"),
    "code_completion": (code_completion, "code"),
    "fewshot_classification": (fewshot_classification, "fewshot"),
    "prose_continuation": (prose_continuation, "prose"),
}
