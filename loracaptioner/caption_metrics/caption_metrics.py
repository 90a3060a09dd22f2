# Copyright 2025 The LoraCaptioner Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""COCO-caption metrics (CIDEr-D, BLEU-1..4, ROUGE-L) as a local `evaluate` module.

Everything lives in this single file on purpose: `evaluate.load(<folder>)` copies
only the script named after its folder into the modules cache, so helpers in a
sibling file would not be importable from the loaded module.

The scores are numerically equal (to ~1e-12) to the scorers of the
`pycocoevalcap` package (`Cider`, `Bleu(4)`, `Rouge`) when both are fed the same
tokenised strings.  The algorithms are re-implemented here from their
publications; no Java and no `pycocoevalcap` import are needed.

Tokenisation emulates what `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`
does (Stanford CoreNLP 3.4.1 `PTBTokenizer -preserveLines -lowerCase`, followed
by removal of a fixed list of punctuation tokens) with a small pure-Python
longest-match lexer.  It reproduces the Stanford behaviour for ordinary English
captions, including its quirks: clitics are split ("don't" -> "do n't",
"man's" -> "man 's", "cannot" -> "can not"), hyphenated words are kept
("black-and-white"), brackets become "-lrb-"/"-rrb-"/... tokens which are *not*
removed (the COCO punctuation list is upper case but the tokens were lower-cased),
"?!" stays a token, abbreviations such as "mr." / "st." / "u.s." keep their
period, etc.  Exotic input (markup, URLs, rare symbols) is approximated.
"""

import math
import re
import unicodedata
from collections import Counter
from typing import Dict, List, Sequence, Tuple, Union

import datasets
import evaluate


_CITATION = """\
@inproceedings{vedantam2015cider,
  title     = {CIDEr: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {4566--4575},
  year      = {2015}
}
@inproceedings{papineni2002bleu,
  title     = {BLEU: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics},
  pages     = {311--318},
  year      = {2002}
}
@inproceedings{lin2004rouge,
  title     = {ROUGE: A Package for Automatic Evaluation of Summaries},
  author    = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  pages     = {74--81},
  year      = {2004}
}
@article{chen2015microsoft,
  title   = {Microsoft COCO Captions: Data Collection and Evaluation Server},
  author  = {Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh
             and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal = {arXiv preprint arXiv:1504.00325},
  year    = {2015}
}
"""

_DESCRIPTION = """\
Image-captioning metrics as computed by the MS-COCO caption evaluation toolkit
(`pycocoevalcap`), re-implemented in pure Python (no Java):

* CIDEr-D (what `pycocoevalcap.cider.Cider` computes): TF-IDF weighted n-gram
  (n = 1..4) cosine similarity between the candidate and every reference, with
  document frequencies computed over the reference sets of the evaluated corpus
  (IDF = log(#images) - log(max(1, df))), clipping of the candidate weights by
  the reference weights, a Gaussian length penalty exp(-delta^2 / (2 * 6^2)),
  averaged over n-gram orders and references and multiplied by 10; corpus score
  is the mean over images.  Note: because the IDF uses the corpus of references
  that is being evaluated, the score of an image depends on the whole corpus.
* BLEU-1..4 (what `pycocoevalcap.bleu.Bleu(4)` computes): corpus-level BLEU with
  clipped n-gram counts, the "closest" effective reference length (ties broken
  towards the shorter reference) and the toolkit's smoothing constants
  (1e-15 added to matches, 1e-9 to the candidate n-gram counts).
* ROUGE-L (what `pycocoevalcap.rouge.Rouge` computes): LCS-based F-measure with
  beta = 1.2, using the best precision and best recall over the references of an
  image; corpus score is the mean over images.

Captions are lower-cased and tokenised like the COCO toolkit does (Stanford PTB
tokenizer + removal of punctuation tokens), via a pure-Python emulation of the
Stanford tokenizer (see `coco_tokenize`).  Scores are on the toolkit's scale
(CIDEr-D is x10, i.e. typically 0..~1.5; BLEU and ROUGE-L in [0, 1]).
"""

_KWARGS_DESCRIPTION = """
Computes COCO-caption metrics for generated captions against references.
Args:
    predictions (`list` of `str`): one generated caption per image.
    references (`list` of `list` of `str`): for every prediction, the list of its
        reference captions (any number >= 1; the count may differ between
        images).  A flat `list` of `str` (exactly one reference per image) is
        also accepted.
    tokenize (`bool`, defaults to `True`): apply the COCO (PTB-style)
        tokenisation to predictions and references.  If `False`, the inputs are
        considered already tokenised and are simply split on whitespace.
Returns:
    `dict` with the float scores:
        'cider': CIDEr-D (pycocoevalcap `Cider` scale, i.e. x10),
        'bleu_1', 'bleu_2', 'bleu_3', 'bleu_4': corpus BLEU-n,
        'rouge_l': ROUGE-L F-measure (beta = 1.2).
Raises:
    ValueError: if the corpus is empty, if the numbers of predictions and
        references differ, or if an image has no reference.
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/caption_metrics")  # path to this folder
    >>> results = metric.compute(
    ...     predictions=["A dog runs on the grass.", "Two cats sleep on a sofa."],
    ...     references=[
    ...         ["A dog is running on the grass.", "A brown dog runs across a lawn."],
    ...         ["Two cats are sleeping on a couch."],
    ...     ],
    ... )
    >>> sorted(results)
    ['bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'cider', 'rouge_l']
"""

__all__ = [
    "PUNCTUATIONS",
    "ptb_tokenize",
    "coco_tokenize",
    "cider_d",
    "bleu",
    "rouge_l",
    "compute_caption_metrics",
    "CaptionMetrics",
]

# --------------------------------------------------------------------------- #
# Tokenisation                                                                #
# --------------------------------------------------------------------------- #

#: Tokens dropped by the COCO toolkit after PTB tokenisation.  They are compared
#: with the *lower-cased* tokens, so the bracket escapes ("-LRB-", ...) never
#: match and survive as "-lrb-", ... -- this is reproduced on purpose.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Words whose trailing period is part of the token whatever follows
# ("mr.", "st.", "etc.", ...), as observed with the Stanford tokenizer 3.4.1.
_ABBREV_ALWAYS = frozenset(
    """mr mrs ms messrs dr drs prof profs sen sens rep reps atty attys lt col gen gov govs
    adm rev maj sgt cpl pvt capt mt st ste ave pres lieut hon brig cmdr comdr pfc spc
    supt supts det mme mlle jr sr bros blvd rd esq etc al seq vs cf ft bldg
    jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    calif conn fla mich va ariz tenn mo ala colo ga ind kan kans ky md minn mont neb nev
    okla vt wis wyo dak penn inc co cos corp pty ltd plc bancorp dept bhd assn univ intl
    sys tel est ext sq ct adj adv assoc asst mfg natl treas wm jos""".split()
)
# Words that keep their period only when a number follows ("no. 5", "fig. 3").
_ABBREV_BEFORE_NUMBER = frozenset("no nos fig figs art pp op prop ca".split())
# Capitalised words after which "x." (a single letter + period) ends a sentence.
_SENTENCE_STARTERS = frozenset(
    """a about according after an as at but here her he however if in it last many more
    now once one other our she since so some such that the their then there these they
    this we what when while yet you""".split()
)
# Multi-letter dotted forms that behave like acronyms.
_ABBREV_DOTTED = frozenset(["ph.d", "ed.d"])
# "cannot" -> "can not", "gonna" -> "gon na", ... (PTB splits assimilations).
_ASSIMILATIONS = {
    "cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3,
}

_BRACKETS = {
    "(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
}

# Characters rewritten before lexing (Unicode quotes/dashes/ellipsis, some currency).
_CHAR_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u00ab": '"', "\u00bb": '"',
    "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ",
    "\u2026": " ... ",
    "\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3",
    "\u00a2": " cents ", "\u20ac": "$", "\u00a3": "#",
    "\u00ad": "",  # soft hyphen
}
_ENTITIES = (("&amp;", "&"), ("&quot;", '"'), ("&lt;", "<"), ("&gt;", ">"))

_L = r"[^\W\d_]"  # a letter
_AN = r"[^\W_]"  # a letter or a digit
_WC = r"(?:[^\W_]|_(?=[^\W_]))"  # a letter/digit, or an underscore inside a word
_NUMBER = r"[-+]?(?:\d*(?:[.:,]\d+)+|\d+)"
_THING_PART = rf"\d+(?:[.,]\d+)+|(?:[dDoOlL]'{_AN})?{_WC}+"

# (name, pattern) in priority order: the longest match wins, ties go to the
# earlier rule (JFlex semantics).
_RULES = [
    ("keep", r"<[A-Za-z/!?][^<>\n]*>"),  # SGML / HTML-ish tags are kept as tokens
    ("url", r"(?:https?|ftp)://[^\s\"<>|()]*[^\s\"<>|.!?(){},-]"),
    ("keep", r"[\w][\w.+-]*@[\w-]+(?:\.[\w-]+)+"),  # e-mail address
    ("keep", r"@\w+|#[^\W\d]\w*"),  # @handle, #hashtag
    ("assim", r"(?i:cannot|gonna|gotta|wanna|lemme|gimme)(?!\w)"),
    ("tis", r"(?i:'t(?:is|was))(?!\w)"),
    ("neg", rf"(?i:({_L}+)(n't))(?!\w)"),
    ("clitic", rf"(?i:({_AN}+)('(?:s|m|d|re|ve|ll)))(?!\w)"),
    ("keep", r"(?i:'(?:s|m|d|re|ve|ll)|n't)(?!\w)"),
    ("keep", r"(?i:'n'|(?:'em|'till?|'cause|'n|'[2-9]0s)(?!\w))"),
    ("keep", r"(?i:dunkin'|somethin'|ol'|nor'easter|li'l|e'er|s'mores|ev'ry|nat'l|c'mon)"),
    ("keep", r"[lLdDjJ]'|[yY]'(?=[^\W\d_])"),
    ("keep", r"[^\W\d_]+[aeiouyAEIOUY]'[aeiouA-Z][^\W\d_]*"),
    ("keep", r"[A-HJ-XZn]'[^\W\d_]{2,}"),
    ("keep", r"[A-Z]+(?:[+&][A-Z]+)+"),  # AT&T, Q&A
    ("slash", rf"\w+(?:-{_L}+){{0,2}}(?:/\w+(?:-{_L}+){{0,2}}){{1,2}}"),
    ("word", rf"{_L}{_WC}*(?:[.!?]{_L}{_WC}*)*"),
    ("word", rf"(?:{_THING_PART})(?:-(?:{_THING_PART}))*"),
    ("word", _NUMBER),
    ("keep", r"(?i:us\$)|&#?\w+;"),
    ("drop", r"\.+|[?!]+|-{2,}|-|''|``|[\"'`]|[,;:]"),
    ("keep", r"\*+"),
]
_COMPILED_RULES = [(name, re.compile(pattern)) for name, pattern in _RULES]
# Plain ASCII words/numbers followed by a space, the end, or punctuation that can
# never be part of a longer token: lexed without trying every rule.
_FAST_WORD = re.compile(r"[A-Za-z0-9]+(?=\s|$|[;()\[\]{}\"]|,(?!\d)|:(?![\d/])|[!?](?![^\W\d_])|\.(?:\s|$))")
_SPACE = re.compile(r"\s+")
_ACRONYM = re.compile(rf"(?:{_L}\.)+{_L}")
_NEXT_WORD = re.compile(r"\s+([A-Z][^\W_]*)(?![\w'])")
_NEXT_IS_NUMBER = re.compile(r"\s*\d")


def _normalise(text: str) -> str:
    for entity, char in _ENTITIES:
        if entity in text:
            text = text.replace(entity, char)
    chars = []
    for ch in text:
        mapped = _CHAR_MAP.get(ch)
        if mapped is not None:
            chars.append(mapped)
        elif ord(ch) > 0xFFFF or unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn"):
            # emoji and other characters Stanford 3.4.1 deletes as untokenisable;
            # control characters (tab, newline, ...) become spaces.
            chars.append(" " if ch.isspace() else "")
        else:
            chars.append(ch)
    return "".join(chars)


def _attach_period(token: str, text: str, end: int) -> bool:
    """Whether the period at ``text[end]`` belongs to ``token`` (abbreviations)."""
    lower = token.lower()
    if lower in _ABBREV_ALWAYS or lower in _ABBREV_DOTTED or _ACRONYM.fullmatch(token):
        return True
    if len(token) == 1 and token.isalpha():
        # single letters ("plan b.", "j. smith") keep the period unless a typical
        # capitalised sentence opener follows ("... plan b. The ...")
        nxt = _NEXT_WORD.match(text, end + 1)
        return not (nxt and nxt.group(1).lower() in _SENTENCE_STARTERS)
    if lower in _ABBREV_BEFORE_NUMBER:
        return _NEXT_IS_NUMBER.match(text, end + 1) is not None
    return False


def ptb_tokenize(text: str) -> List[str]:
    """Tokenise ``text`` like Stanford's PTBTokenizer (3.4.1) with ``-lowerCase``.

    Returns the lower-cased tokens, punctuation included (see `coco_tokenize`
    for the COCO post-processing).  Newlines are treated as spaces.

    >>> ptb_tokenize("Don't touch the man's black-and-white hat (please).")
    ['do', "n't", 'touch', 'the', 'man', "'s", 'black-and-white', 'hat', '-lrb-', 'please', '-rrb-', '.']
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    text = _normalise(text)
    tokens: List[str] = []
    pos, n = 0, len(text)
    while pos < n:
        space = _SPACE.match(text, pos)
        if space:
            pos = space.end()
            continue
        fast = _FAST_WORD.match(text, pos)
        if fast and fast.group().lower() not in _ASSIMILATIONS:
            tok, end = fast.group(), fast.end()
            if end < n and text[end] == "." and _attach_period(tok, text, end):
                tok, end = tok + ".", end + 1
            tokens.append(tok)
            pos = end
            continue
        best_name, best = None, None
        for name, regex in _COMPILED_RULES:
            m = regex.match(text, pos)
            if m and m.end() > pos and (best is None or m.end() > best.end()):
                best_name, best = name, m
        if best is None:  # any other single character is a token of its own
            ch = text[pos]
            tokens.append(_BRACKETS.get(ch, ch))
            pos += 1
            continue
        tok, end = best.group(), best.end()
        if best_name == "word":
            if end < n and text[end] == "." and _attach_period(tok, text, end):
                tok, end = tok + ".", end + 1
            tokens.append(tok)
        elif best_name == "assim":
            cut = _ASSIMILATIONS[tok.lower()]
            tokens.extend((tok[:cut], tok[cut:]))
        elif best_name == "tis":
            tokens.extend((tok[:2], tok[2:]))
        elif best_name in ("neg", "clitic"):
            tokens.extend((best.group(1), best.group(2)))
        elif best_name == "drop":
            # punctuation: normalise like PTB ("..." for dot runs, "--" for dash runs,
            # quotes become `` / ''); all of these are removed by the COCO filter
            if tok.startswith("."):
                tokens.extend(["..."] if len(tok) >= 3 else ["."] * len(tok))
            elif tok.startswith("--"):
                tokens.append("--")
            elif tok == '"':
                tokens.append("''")
            else:
                tokens.append(tok)
        else:  # "keep", "url", ...
            # the Stanford tokenizer turns spaces inside tokens (tags) into U+00A0
            tokens.append(_SPACE.sub("\u00a0", tok))
        pos = end
    return [t.lower() for t in tokens]


def coco_tokenize(text: str) -> str:
    """Tokenise a caption like the COCO toolkit's ``PTBTokenizer`` does.

    Lower-cases, applies PTB tokenisation (`ptb_tokenize`), removes the
    punctuation tokens listed in `PUNCTUATIONS` and joins with single spaces.

    >>> coco_tokenize("A man riding a wave on top of a surfboard.")
    'a man riding a wave on top of a surfboard'
    >>> coco_tokenize("Don't do that, it's the man's dog!")
    "do n't do that it 's the man 's dog"
    """
    return " ".join(t for t in ptb_tokenize(text) if t not in PUNCTUATIONS)


# --------------------------------------------------------------------------- #
# Scorers (operate on lists of tokens)                                        #
# --------------------------------------------------------------------------- #

Tokens = Sequence[str]


def _ngrams(tokens: Tokens, max_n: int = 4) -> Counter:
    """Counts of all n-grams (as tuples) of orders 1..max_n."""
    tokens = tuple(tokens)
    counts: Counter = Counter()
    for order in range(1, max_n + 1):
        counts.update(zip(*(tokens[shift:] for shift in range(order))))
    return counts


def _check_corpus(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) == 0:
        raise ValueError("Cannot compute caption metrics on an empty corpus (no predictions given).")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"Got {len(hypotheses)} predictions but {len(references)} reference lists; "
            "there must be exactly one list of references per prediction."
        )
    for index, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"Prediction #{index} has no reference caption; at least one is required.")


def cider_d(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    max_n: int = 4,
    sigma: float = 6.0,
) -> Tuple[float, List[float]]:
    """CIDEr-D of tokenised captions, as `pycocoevalcap.cider.Cider` computes it.

    Returns ``(corpus_score, per_image_scores)``.  Document frequencies are
    counted over the reference sets of *this* corpus: an n-gram's df is the
    number of images whose references contain it, and its IDF is
    ``log(#images) - log(max(df, 1))``.  The length used by the Gaussian
    penalty is, as in the reference implementation, the number of bigrams of a
    caption (``max(len - 1, 0)``).
    """
    _check_corpus(hypotheses, references)
    hyp_counts = [_ngrams(h, max_n) for h in hypotheses]
    ref_counts = [[_ngrams(r, max_n) for r in refs] for refs in references]

    doc_freq: Counter = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_num_images = math.log(float(len(ref_counts)))
    # n-grams absent from all references (df = 0) are treated like df = 1: idf = log(#images)
    idf = {gram: log_num_images - math.log(max(1.0, float(df))) for gram, df in doc_freq.items()}

    def tfidf(counts: Counter, length: int):
        weights: List[Dict[tuple, float]] = [{} for _ in range(max_n)]
        squared = [0.0] * max_n
        for gram, tf in counts.items():
            value = float(tf) * idf.get(gram, log_num_images)
            weights[len(gram) - 1][gram] = value
            squared[len(gram) - 1] += value * value
        return weights, [math.sqrt(s) for s in squared], max(length - 1, 0)

    penalty_denominator = 2.0 * sigma * sigma
    scores: List[float] = []
    for hyp, h_counts, refs, r_counts_list in zip(hypotheses, hyp_counts, references, ref_counts):
        h_vec, h_norm, h_len = tfidf(h_counts, len(hyp))
        total = [0.0] * max_n
        for ref, r_counts in zip(refs, r_counts_list):
            r_vec, r_norm, r_len = tfidf(r_counts, len(ref))
            penalty = math.exp(-float(h_len - r_len) ** 2 / penalty_denominator)
            for order in range(max_n):
                ref_weights = r_vec[order]
                dot = 0.0
                for gram, h_weight in h_vec[order].items():
                    r_weight = ref_weights.get(gram, 0.0)
                    dot += min(h_weight, r_weight) * r_weight  # clipped ("-D") similarity
                if h_norm[order] != 0 and r_norm[order] != 0:
                    dot /= h_norm[order] * r_norm[order]
                total[order] += dot * penalty
        scores.append(10.0 * (sum(total) / max_n) / len(refs))
    return sum(scores) / len(scores), scores


def bleu(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    max_n: int = 4,
) -> List[float]:
    """Corpus BLEU-1..max_n as `pycocoevalcap.bleu.Bleu(max_n)` computes it.

    Clipped n-gram precision summed over the corpus; the effective reference
    length of a candidate is its *closest* reference length (the shorter one on
    ties); 1e-15 is added to the match counts and 1e-9 to the candidate n-gram
    counts (so empty inputs give 0 instead of a division by zero); brevity
    penalty ``exp(1 - r/c)`` when ``c < r`` (with the same smoothing).
    """
    _check_corpus(hypotheses, references)
    tiny, small = 1e-15, 1e-9
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_length = 0
    ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        length = len(hyp)
        hyp_length += length
        # "closest" effective reference length; ties go to the shorter reference
        ref_length += min((abs(len(r) - length), len(r)) for r in refs)[1]
        max_ref_counts: Dict[tuple, int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref, max_n).items():
                if count > max_ref_counts.get(gram, 0):
                    max_ref_counts[gram] = count
        for gram, count in _ngrams(hyp, max_n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))
        for order in range(1, max_n + 1):
            totals[order - 1] += max(0, length - order + 1)

    scores = []
    precision_product = 1.0
    for order in range(max_n):
        precision_product *= float(matches[order] + tiny) / (totals[order] + small)
        scores.append(precision_product ** (1.0 / (order + 1)))
    ratio = (hyp_length + tiny) / (ref_length + small)
    if ratio < 1:
        brevity = math.exp(1 - 1 / ratio)
        scores = [s * brevity for s in scores]
    return scores


def _lcs_length(a: Tokens, b: Tokens) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            if token_a == token_b:
                current.append(previous[j] + 1)
            else:
                current.append(max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    beta: float = 1.2,
) -> Tuple[float, List[float]]:
    """ROUGE-L as `pycocoevalcap.rouge.Rouge` computes it.

    Per image: LCS-based precision and recall against every reference, the
    maximum precision and the maximum recall (taken independently) are combined
    into ``(1 + beta^2) P R / (R + beta^2 P)``; the corpus score is the mean.
    Like the reference implementation (which splits on single spaces), an
    empty caption counts as one empty token.
    """
    _check_corpus(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        hyp = list(hyp) or [""]
        best_precision, best_recall = 0.0, 0.0
        for ref in refs:
            ref = list(ref) or [""]
            common = _lcs_length(ref, hyp)
            best_precision = max(best_precision, common / float(len(hyp)))
            best_recall = max(best_recall, common / float(len(ref)))
        if best_precision != 0 and best_recall != 0:
            score = ((1 + beta ** 2) * best_precision * best_recall) / float(
                best_recall + beta ** 2 * best_precision
            )
        else:
            score = 0.0
        scores.append(score)
    return sum(scores) / len(scores), scores


# --------------------------------------------------------------------------- #
# Public entry point                                                          #
# --------------------------------------------------------------------------- #


def _as_reference_lists(references: Sequence) -> List[List[str]]:
    return [[refs] if isinstance(refs, str) else list(refs) for refs in references]


def compute_caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Union[str, Sequence[str]]],
    tokenize: bool = True,
) -> Dict[str, float]:
    """Compute CIDEr-D, BLEU-1..4 and ROUGE-L (pycocoevalcap scales).

    Args:
        predictions: one caption per image.
        references: for each image, a list of reference captions (or one string).
        tokenize: apply `coco_tokenize` first; if False, split on whitespace.

    Returns:
        ``{"cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"}`` floats.
    """
    if predictions is None or references is None:
        raise ValueError("Both `predictions` and `references` must be given.")
    predictions = list(predictions)
    references = _as_reference_lists(references)
    _check_corpus(predictions, references)
    for caption in predictions + [r for refs in references for r in refs]:
        if not isinstance(caption, str):
            raise TypeError(f"Captions must be strings, got {type(caption).__name__}: {caption!r}")

    # The strings pycocoevalcap would receive: tokenised captions joined by single spaces.
    normalise = coco_tokenize if tokenize else (lambda s: " ".join(s.split()))
    hyp_strings = [normalise(p) for p in predictions]
    ref_strings = [[normalise(r) for r in refs] for refs in references]

    # CIDEr-D and BLEU split on any whitespace, ROUGE-L on single spaces (as in
    # pycocoevalcap; this only differs for the rare U+00A0 inside a kept tag).
    hyp_tokens = [s.split() for s in hyp_strings]
    ref_tokens = [[s.split() for s in refs] for refs in ref_strings]
    cider_score, _ = cider_d(hyp_tokens, ref_tokens)
    bleu_scores = bleu(hyp_tokens, ref_tokens, max_n=4)
    rouge_score, _ = rouge_l(
        [s.split(" ") for s in hyp_strings], [[s.split(" ") for s in refs] for refs in ref_strings]
    )
    result = {"cider": float(cider_score)}
    result.update({f"bleu_{n + 1}": float(s) for n, s in enumerate(bleu_scores)})
    result["rouge_l"] = float(rouge_score)
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionMetrics(evaluate.Metric):
    """COCO-caption CIDEr-D / BLEU-1..4 / ROUGE-L, equal to pycocoevalcap's scorers."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/tylin/coco-caption"],
            reference_urls=[
                "https://arxiv.org/abs/1411.5726",
                "https://aclanthology.org/P02-1040",
                "https://aclanthology.org/W04-1013",
                "https://arxiv.org/abs/1504.00325",
            ],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute CIDEr-D, BLEU-1..4 and ROUGE-L; see the module inputs description."""
        # Validate up front: `evaluate` would otherwise fail with less helpful
        # errors (e.g. IndexError on an empty corpus) before reaching `_compute`.
        if predictions is not None and references is not None:
            _check_corpus(list(predictions), _as_reference_lists(references))
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, tokenize: bool = True):
        return compute_caption_metrics(predictions, references, tokenize=tokenize)
