"""The metric functions, on a 0-100 scale (GLUE leaderboard convention: accuracy, F1, MCC and
correlations x100; ROUGE F-measure x100; BLEU and TER are already 0-100). A metric that is
undefined on its input (MCC when gold has one class, a correlation of a constant list) is NaN,
not 0: eval_log.jsonl writes it as null and names it in `nan_fields` (trainkit/runlog.py).

Imports of sklearn / scipy / rouge_score / sacrebleu / nltk happen inside the functions, so importing
trainkit.tasks stays cheap."""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections import Counter


def accuracy(gold: list, pred: list) -> float:
    """Share of predictions equal to gold x100; NaN for no examples (undefined). An invalid answer
    (GLUE: label -1) never equals gold."""
    return 100.0 * sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else math.nan


def f1(gold: list[int], pred: list[int]) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP. A prediction that
    is neither 0 nor 1 (an invalid answer, -1) counts as the label opposite to gold, as T5's
    f1_score_with_invalid does (t5/evaluation/metrics.py): a false negative for a gold 1, a false
    positive for a gold 0. 0 when there are no positives at all (sklearn's zero_division=0)."""
    from sklearn.metrics import f1_score

    pred = [p if p in (0, 1) else 1 - g for g, p in zip(gold, pred)]
    return 100.0 * float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))


def mcc(gold: list[int], pred: list[int]) -> float:
    """Matthews correlation x100 (CoLA) with sklearn, invalid answers (-1) as a class of their own
    (T5's convention): all-invalid predictions give 0, like any constant prediction. NaN (undefined)
    when gold holds fewer than two classes: there is nothing to correlate with."""
    from sklearn.metrics import matthews_corrcoef

    if len(set(gold)) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return 100.0 * float(matthews_corrcoef(gold, pred))


def correlations(gold: list[float], pred: list[float]) -> dict[str, float]:
    """Pearson and Spearman correlation x100 (STS-B) with scipy. NaN (undefined) for fewer than two
    points or a constant gold or prediction list (zero variance: scipy's NaN, not 0)."""
    from scipy.stats import pearsonr, spearmanr

    if len(gold) < 2 or len(set(gold)) < 2 or len(set(pred)) < 2:
        return {"pearson": math.nan, "spearman": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"pearson": 100.0 * float(pearsonr(gold, pred)[0]), "spearman": 100.0 * float(spearmanr(gold, pred)[0])}


# ---------------------------------------------------------------------- ROUGE (SAMSum)
ROUGE_KINDS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Abbreviations after which a period does not end a sentence. nltk.sent_tokenize's pretrained English
# Punkt model (which published SAMSum scripts use) learned a longer list from news text; its data
# cannot be downloaded here, so Punkt runs untrained with these (lower case, without the final period).
SENTENCE_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e",
    "no", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: nltk's Punkt algorithm (untrained) with SENTENCE_ABBREVIATIONS, inside each
    line (a line break always ends a sentence). Used for ROUGE-Lsum, like the common
    `"\\n".join(nltk.sent_tokenize(text))` recipe, which needs the punkt data."""
    splitter = _sentence_splitter()
    return [s.strip() for line in (text or "").splitlines() for s in splitter.tokenize(line) if s.strip()]


@functools.cache
def _sentence_splitter():
    """One Punkt splitter per process (split_sentences runs for every prediction and reference)."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(SENTENCE_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x100 (rouge_score, Porter stemming), the plain mean over examples.

    rougeL is one LCS over the whole text; rougeLsum is rouge_score's summary-level LCS over sentences,
    which it reads as newline-separated lines: prediction and references are split with
    split_sentences and joined with newlines first (rouge1/2/L do not see the newlines). With several
    references an example takes the best one (rouge_score's score_multi); SAMSum has one."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KINDS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KINDS, 0.0)
    for prediction, refs in zip(predictions, references):
        prediction = "\n".join(split_sentences(prediction))
        refs = ["\n".join(split_sentences(r)) for r in refs]
        scores = scorer.score_multi(refs, prediction) if len(refs) > 1 else scorer.score(refs[0], prediction)
        for k in ROUGE_KINDS:
            totals[k] += scores[k].fmeasure
    n = len(predictions)
    return {k: 100.0 * v / n if n else 0.0 for k, v in totals.items()}


# ---------------------------------------------------------------------- BLEU, TER (DART)
_PERL_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")  # what perl's split ' ' splits on (ASCII whitespace only)


def _ngram_counts(words: list[str]) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))


def multi_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU x100 exactly as Moses' multi-bleu.perl computes it (the DART and WebNLG official
    script), on text that is already tokenised: words are split on ASCII whitespace, case is kept.

    references[i] holds example i's references, one per reference file; an empty string is an empty
    line of a reference file and counts, as in the script, as a reference of length 0. Per example
    the reference length is the closest to the hypothesis length, the shorter on a tie; n-gram counts
    are clipped by the largest count in any one reference; no smoothing: 0 when any of the 1-4-gram
    precisions is 0 (the script's log(0) = -9999999999); brevity penalty exp(1 - r/c) when c < r.
    The script prints the result rounded to 2 decimals; this returns it unrounded."""
    correct, total = [0] * 5, [0] * 5
    hyp_length = ref_length = 0
    for hypothesis, refs in zip(hypotheses, references, strict=True):
        if not refs:
            raise ValueError("multi_bleu: every hypothesis needs at least one reference")
        words = [w for w in _PERL_WHITESPACE.split(hypothesis) if w]
        closest_diff = closest_length = 9999
        max_ref_counts: Counter = Counter()
        for ref in refs:
            ref_words = [w for w in _PERL_WHITESPACE.split(ref) if w]
            diff = abs(len(words) - len(ref_words))
            if diff < closest_diff or (diff == closest_diff and len(ref_words) < closest_length):
                closest_diff, closest_length = diff, len(ref_words)
            max_ref_counts |= _ngram_counts(ref_words)  # | keeps the larger count of each n-gram
        hyp_length += len(words)
        ref_length += closest_length
        for ngram, count in _ngram_counts(words).items():
            total[len(ngram)] += count
            correct[len(ngram)] += min(count, max_ref_counts[ngram])
    precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
    if ref_length == 0 or min(precisions) == 0:
        return 0.0
    brevity_penalty = math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0
    return 100.0 * brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / 4)


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (None where an example has fewer)."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def sacrebleu(predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (its defaults: case-sensitive, 13a tokenisation, exp smoothing) on the raw
    text with every reference of each example, and sacrebleu's signature string."""
    from sacrebleu.metrics import BLEU

    return _sacrebleu_corpus(BLEU(), predictions, references)


def ter(predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    """sacrebleu's TER x100 (its reimplementation of tercom 0.7.25; defaults: case-insensitive, no
    normalisation) with every reference of each example, and its signature. Lower is better."""
    from sacrebleu.metrics import TER

    return _sacrebleu_corpus(TER(), predictions, references)


def _sacrebleu_corpus(metric, predictions: list[str], references: list[list[str]]) -> tuple[float, str]:
    """A sacrebleu metric's corpus score (0 for no predictions) and its signature string."""
    if not predictions:
        return 0.0, metric.get_signature().format()
    score = metric.corpus_score(predictions, _reference_streams(references))
    return float(score.score), metric.get_signature().format()
