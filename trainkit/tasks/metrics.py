"""The metric functions, on a 0-100 scale (GLUE leaderboard convention: accuracy, F1, MCC and
correlations x100; ROUGE F-measure x100; sacrebleu BLEU is already 0-100).

Imports of sklearn / scipy / rouge_score / sacrebleu happen inside the functions, so importing
trainkit.tasks stays cheap."""

from __future__ import annotations

import math
import warnings


def accuracy(gold: list, pred: list) -> float:
    return 100.0 * sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def f1(gold: list[int], pred: list[int]) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return 100.0 * float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))


def mcc(gold: list[int], pred: list[int]) -> float:
    """Matthews correlation (CoLA); 0 when undefined (one class only)."""
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(matthews_corrcoef(gold, pred))
    return 100.0 * value if math.isfinite(value) else 0.0


def correlations(gold: list[float], pred: list[float]) -> dict[str, float]:
    """Pearson and Spearman correlation x100 (STS-B); 0 when undefined (constant input, < 2 points)."""
    from scipy.stats import pearsonr, spearmanr

    if len(gold) < 2:
        return {"pearson": 0.0, "spearman": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(pearsonr(gold, pred)[0])
        s = float(spearmanr(gold, pred)[0])
    return {"pearson": 100.0 * p if math.isfinite(p) else 0.0, "spearman": 100.0 * s if math.isfinite(s) else 0.0}


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
