"""The `rules` moderator's matching: term and pattern lists per category, matched on
word boundaries of a normalised text (no I/O besides reading its list).

Normalising a text (what an obfuscated prompt and its plain form have in common):
  1. Unicode NFKC (fullwidth, mathematical and circled letters, ligatures become plain);
  2. confusable letters become the ASCII letter they imitate (Cyrillic er -> "p", Greek
     omicron -> "o"), from the Unicode confusables data as the confusable-homoglyphs
     package ships it;
  3. accents and invisible characters go (NFKD, then combining marks and format
     characters such as zero-width spaces are dropped), then case folding;
  4. leetspeak: inside a token that has at least one letter, digits and symbols that
     stand for letters are read as those letters (`p0rn`, `@ss`, `$ex`); "1" and "|"
     are read both as "i" and as "l"; a token's trailing "!" stays punctuation, so
     "kill!" is "kill", not "killi"; a token of digits alone ("1024") stays a number,
     while one of symbols is read ("@$$").

Separators and word boundaries. A term matches only as a whole word of the normalised
text (no letter or digit right before or after it): "Scunthorpe", "cocktail",
"assassin's", "Sussex", "therapist", "grape" and "skills" contain listed terms but
never as words. Removing separators naively ("k.i.l.l" -> "kill") would also glue real
words together and move those boundaries, so separators are handled in three readings
of the text, each keeping boundaries of its own, and a term counts if any reading has
it as a word:
  - split: punctuation inside a token separates words ("ex-wife" -> "ex wife");
  - joined: punctuation inside a token is dropped ("k.i.l.l", "p_o_r_n", "se*x" -> one
    word); whitespace still separates, so "a sex" never becomes "asex";
  - spelled: a run of three or more single-character words is read as one word
    ("k i l l", "p . o . r . n"), also without its first or last character, which may
    be a real one-letter word ("a p o r n"); shorter runs ("a b") are left alone.
A term of several words also matches with the spaces dropped ("killyourself").
A term ending in "*" matches any word that starts with it. Patterns are regular
expressions searched in every reading, for combinations a word list cannot express.
Allow-listed phrases ("naked mole rat") are blanked out of every reading first.

The file format (IMAGEGEN_MODERATION_RULES_FILE; the shipped list is
moderation_rules.json beside this module):

    {"allow": ["naked mole rat", ...],
     "categories": {"violence": {"terms": ["kill", ...], "patterns": ["..."]}, ...}}
"""

from __future__ import annotations

import functools
import json
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from imagegen.domain.moderation import Category, Verdict

#: Leetspeak: what a digit or symbol stands for inside a word (first reading).
LEET: Mapping[str, str] = {
    "0": "o",
    "1": "i",
    "2": "z",
    "3": "e",
    "4": "a",
    "5": "s",
    "6": "g",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "|": "l",
    "+": "t",
    "€": "e",
}
#: The second reading of the ambiguous ones ("ki11" is "kill", "k1ss" is "kiss").
LEET_ALTERNATIVE: Mapping[str, str] = {"1": "l", "|": "i"}
_LEET_SYMBOLS = frozenset(ch for ch in LEET if not ch.isdigit())
#: Drop these: combining marks and format characters (zero-width space and joiner,
#: soft hyphen, word joiner, bidi controls) that hide inside words.
_DROPPED_CATEGORIES = frozenset({"Mn", "Me", "Cf"})
#: The shortest run of single-character words read as one spelled-out word.
SPELLED_RUN = 3


@functools.cache
def confusable_map() -> Mapping[str, str]:
    """Non-ASCII characters that imitate an ASCII letter or digit -> that character
    (lower case), from the Unicode confusables data."""
    from confusable_homoglyphs import confusables  # ~0.1 s to load: only when first used

    letters = set(string.ascii_letters)
    digits = set(string.digits)
    mapping: dict[str, str] = {}
    for char, homoglyphs in confusables.confusables_data.items():
        if char.isascii() or len(char) != 1:
            continue
        candidates = [h["c"] for h in homoglyphs]
        letter = next((c for c in candidates if c in letters), None)
        digit = next((c for c in candidates if c in digits), None)
        if letter is not None:
            mapping[char] = letter.lower()
        elif digit is not None:
            mapping[char] = digit
    return mapping


def normalise_characters(text: str) -> str:
    """Steps 1-3: NFKC, confusables to ASCII, accents and invisibles dropped, case folded."""
    confusables = confusable_map()
    text = unicodedata.normalize("NFKC", text)
    text = "".join(confusables.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKD", text)
    kept = (ch for ch in text if unicodedata.category(ch) not in _DROPPED_CATEGORIES)
    return unicodedata.normalize("NFC", "".join(kept)).casefold()


def _is_wordlike(char: str) -> bool:
    return char.isalnum() or char in _LEET_SYMBOLS


def _split_token(token: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    for char in token:
        if _is_wordlike(char):
            current.append(char)
        elif current:
            pieces.append("".join(current))
            current = []
    if current:
        pieces.append("".join(current))
    return pieces


def _spelled(words: list[str], trim_first: bool, trim_last: bool) -> list[str]:
    out: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1:
            run.append(word)
            continue
        if len(run) >= SPELLED_RUN:
            # A spelled-out word may sit next to a real one-letter word ("a p o r n",
            # "i k i l l"): the trimmed variants give it its own boundaries.
            head = run[:1] if trim_first else []
            tail = run[-1:] if trim_last else []
            core = run[len(head) : len(run) - len(tail)]
            out.extend([*head, "".join(core), *tail])
        else:
            out.extend(run)
        run = []
        if word:
            out.append(word)
    return out


def _deleet(word: str, alternative: bool) -> str:
    core = word.rstrip("!")
    if not any(ch.isalpha() or ch in _LEET_SYMBOLS for ch in core):
        return word  # a number stays a number ("1024", "300")
    table = {**LEET, **LEET_ALTERNATIVE} if alternative else LEET
    return "".join(table.get(ch, ch) for ch in core)


def readings(text: str) -> list[str]:
    """Every reading of a text that terms and patterns are matched in: split, joined and
    spelled, each as written, with leetspeak read, and with its alternative reading.
    Words are separated by single spaces; boundaries are the string's ends and spaces."""
    normal = normalise_characters(text)
    tokens = normal.split()
    split = [piece for token in tokens for piece in _split_token(token)]
    joined = ["".join(_split_token(token)) for token in tokens]
    joined = [word for word in joined if word]
    variants: list[list[str]] = [
        split,
        joined,
        *(_spelled(split, first, last) for first in (False, True) for last in (False, True)),
    ]
    ambiguous = any(ch in LEET_ALTERNATIVE for ch in normal)
    found: list[str] = []
    for words in variants:
        candidates = [words, [_deleet(w, False) for w in words]]
        if ambiguous:
            candidates.append([_deleet(w, True) for w in words])
        for candidate in candidates:
            line = " ".join(candidate)
            if line not in found:
                found.append(line)
    return found


# --- the rule set -----------------------------------------------------------------------

_BEFORE = r"(?<![^\W_])"
_AFTER = r"(?![^\W_])"


def _term_pattern(term: str) -> str:
    prefix = term.endswith("*")
    words = normalise_characters(term.rstrip("*")).split()
    if not words:
        raise RulesFileError(f"empty term {term!r}")
    body = r"\s*".join(re.escape(word) for word in words)
    return body if prefix else body + _AFTER


def _compile_terms(terms: Iterable[str]) -> re.Pattern[str] | None:
    parts = sorted({_term_pattern(t) for t in terms}, key=len, reverse=True)
    if not parts:
        return None
    return re.compile(_BEFORE + "(?:" + "|".join(f"(?:{p})" for p in parts) + ")")


class RulesFileError(ValueError):
    """The rules file is malformed; the message names the entry."""


@dataclass(frozen=True)
class CategoryRules:
    """One category's compiled terms and patterns."""

    category: Category
    terms: re.Pattern[str] | None
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, reading: str) -> bool:
        if self.terms is not None and self.terms.search(reading):
            return True
        return any(p.search(reading) for p in self.patterns)


@dataclass(frozen=True)
class RuleSet:
    """Term and pattern lists per category, compiled; `judge` is the moderator's work."""

    categories: tuple[CategoryRules, ...]
    allow: re.Pattern[str] | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> RuleSet:
        """Build from the file's JSON object; raises ValueError naming a bad entry."""
        unknown = set(data) - {"allow", "categories", "comment"}
        if unknown:
            raise RulesFileError(f"unknown keys in the rules file: {sorted(unknown)}")
        raw_categories = data.get("categories") or {}
        if not isinstance(raw_categories, dict):
            raise RulesFileError("categories must be an object")
        compiled: list[CategoryRules] = []
        for name, body in raw_categories.items():
            try:
                category = Category(name)
            except ValueError:
                raise RulesFileError(f"unknown category {name!r} in the rules file") from None
            if not isinstance(body, dict) or set(body) - {"terms", "patterns"}:
                raise RulesFileError(f"{name}: expected {{'terms': [...], 'patterns': [...]}}")
            terms = [str(t) for t in body.get("terms") or ()]
            patterns: list[re.Pattern[str]] = []
            for source in body.get("patterns") or ():
                try:
                    patterns.append(re.compile(str(source)))
                except re.error as exc:
                    raise RulesFileError(f"{name}: bad pattern {source!r}: {exc}") from None
            compiled.append(CategoryRules(category, _compile_terms(terms), tuple(patterns)))
        allow_terms = [str(t).rstrip("*") for t in data.get("allow") or ()]  # type: ignore[attr-defined]
        return cls(tuple(compiled), _compile_terms(allow_terms))

    @classmethod
    def load(cls, path: Path | None = None) -> RuleSet:
        """The rules in `path`, or the shipped default list."""
        if path is None:
            text = resources.files(__package__ or "imagegen.domain").joinpath(
                "moderation_rules.json"
            ).read_text(encoding="utf-8")
        else:
            text = path.read_text(encoding="utf-8")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise RulesFileError("a rules file is a JSON object")
        return cls.from_mapping(data)

    def judge(self, text: str) -> Verdict:
        """The categories whose terms or patterns the text has (score 1.0 each)."""
        found: dict[Category, float] = {}
        for reading in readings(text):
            visible = reading if self.allow is None else self.allow.sub(" ", reading)
            for rules in self.categories:
                if rules.category not in found and rules.matches(visible):
                    found[rules.category] = 1.0
        return Verdict(found)
