"""The metric functions, on a 0-100 scale (GLUE leaderboard convention: accuracy, F1, MCC and
correlations x100; ROUGE F-measure x100; sacrebleu BLEU is already 0-100). A metric that is
undefined on its input (MCC when gold has one class, a correlation of a constant list) is NaN,
not 0: eval_log.jsonl writes it as null and names it in `nan_fields` (trainkit/runlog.py).

Imports of sklearn / scipy / rouge_score / sacrebleu happen inside the functions, so importing
trainkit.tasks stays cheap."""

from __future__ import annotations

import math
import warnings


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


def rouge(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x100 (rouge_score, Porter stemming). With several references an
    example takes the best one (rouge_score's score_multi); SAMSum has one."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, prediction) if len(refs) > 1 else scorer.score(refs[0], prediction)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = len(predictions)
    return {k: 100.0 * v / n if n else 0.0 for k, v in totals.items()}


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenisation, exp smoothing) with a variable number of
    references per example (missing ones passed as None, which sacrebleu skips)."""
    import sacrebleu

    if not predictions:
        return 0.0
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)
