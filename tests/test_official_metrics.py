"""DART and SAMSum metrics against the official definitions: multi-bleu.perl (the committed copy of
the script DART's run_eval_on_dart.sh runs, as an oracle), the official figure on the shipped
BART-large output, the references' tokenisation, and rouge_score's own ROUGE-Lsum."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trainkit.tasks import Example, get_task, official_metrics, reported_metrics, selection_score
from trainkit.tasks import metrics as M
from trainkit.tasks.dart import official_bleu, official_tokenize

DART = Path(__file__).resolve().parent / "official" / "dart"
OFFICIAL_BART_BLEU = 48.56  # perl multi-bleu.perl reference0 reference1 reference2 < bart-large_dart.txt (README there)
needs_perl = pytest.mark.skipif(shutil.which("perl") is None, reason="perl is not installed")


def lines(name: str) -> list[str]:
    with gzip.open(DART / name, "rt", encoding="utf-8", newline="") as f:
        return f.read().splitlines()  # the files have \r\n line ends


def shipped_files() -> tuple[list[str], list[list[str]]]:
    hypotheses = lines("bart-large_dart.txt.gz")
    files = [lines(f"all-delex-reference{k}.lex.gz") for k in range(3)]
    return hypotheses, [list(refs) for refs in zip(*files, strict=True)]


def perl_multi_bleu(tmp_path: Path, hypotheses: list[str], references: list[list[str]]) -> float:
    """The official script's printed BLEU: reference k of every example in file k (an empty line where
    an example has fewer), hypotheses on stdin."""
    width = max(len(r) for r in references)
    files = []
    for k in range(width):
        path = tmp_path / f"ref{k}.txt"
        path.write_text("".join((refs[k] if k < len(refs) else "") + "\n" for refs in references), encoding="utf-8")
        files.append(str(path))
    result = subprocess.run(["perl", str(DART / "multi-bleu.perl"), *files], input="".join(h + "\n" for h in hypotheses),
                            capture_output=True, text=True, encoding="utf-8", timeout=120)
    match = re.match(r"BLEU = ([\d.]+),", result.stdout)
    assert match, (result.returncode, result.stdout, result.stderr)
    return float(match.group(1))


# ---------------------------------------------------------------------- DART BLEU
def test_dart_bleu_reproduces_the_official_figure_on_the_shipped_bart_output():
    hypotheses, references = shipped_files()
    assert len(hypotheses) == len(references) == 5097
    assert abs(M.multi_bleu(hypotheses, references) - OFFICIAL_BART_BLEU) < 0.05
    # the whole pipeline (tokenise + lower-case again, pad to 3 references) on the same files
    assert abs(official_bleu(hypotheses, [[r for r in refs if r] for refs in references]) - OFFICIAL_BART_BLEU) < 0.05
    # what the project reported before (sacreBLEU on the same files) is ~1 point off
    assert abs(M.sacrebleu(hypotheses, [[r for r in refs if r] for refs in references])[0] - OFFICIAL_BART_BLEU) > 0.5


@needs_perl
def test_the_perl_oracle_prints_the_official_figure_for_the_shipped_files(tmp_path):
    hypotheses, references = shipped_files()
    assert perl_multi_bleu(tmp_path, hypotheses, references) == OFFICIAL_BART_BLEU == round(M.multi_bleu(hypotheses, references), 2)


def test_tokenisation_reproduces_the_released_references():
    """The raw test-set texts of every 10th entry, tokenised + lower-cased, are the .lex reference lines."""
    files = [lines(f"all-delex-reference{k}.lex.gz") for k in range(3)]
    rows = [json.loads(line) for line in lines("test-raw-references-every10th.jsonl.gz")]
    pairs = [(raw, files[k][row["line"]]) for row in rows for k, raw in enumerate(row["references"][:3])]
    assert len(pairs) > 1000
    assert [official_tokenize(raw) for raw, _ in pairs] == [lex for _, lex in pairs]
    # and so official_bleu from the raw references scores as multi-bleu.perl on the released files
    hypotheses = lines("bart-large_dart.txt.gz")
    hyps = [hypotheses[row["line"]] for row in rows]
    lex = [[f[row["line"]] for f in files] for row in rows]
    assert official_bleu(hyps, [row["references"] for row in rows]) == pytest.approx(M.multi_bleu(hyps, lex), abs=1e-9)


@pytest.mark.parametrize("raw, tokens", [
    ("Jeff Daniels played in the Hawaii Five-O episode", "jeff daniels played in the hawaii five - o episode"),
    ("Amsterdam's runway, ISBN 978-0-15-204770-2.", "amsterdam ' s runway , isbn 978 - 0 - 15 - 204770 - 2 ."),
    ("Washington D.C., USA: £30 or 65.38%!", "washington d . c . , usa : £ 30 or 65 . 38 % !"),
    ("The Atatürk Monument (İzmir)", "the atatürk monument ( i\u0307zmir )"),  # one token: tokenised, then lower-cased
    ("  tabs\tand   spaces ", "tabs and spaces"),
])
def test_official_tokenize(raw, tokens):
    assert official_tokenize(raw) == tokens


# (hypotheses, references per example): each case is a rule of multi-bleu.perl; sacreBLEU shares the
# last two (tie rule, clipping and brevity penalty) and does the others differently
SAME_AS_SACREBLEU = {"closest length tie takes the shorter", "clipping and brevity"}
PERL_CASES = {
    # an empty reference line is a reference of length 0: closest to the short 2nd hypothesis, so no brevity penalty
    "empty reference line counts": (["the cat sat on the mat", "a dog"],
                                    [["the cat sat on the mat", ""], ["a dog ran in the big park today", ""]]),
    # no smoothing: no matching 4-gram -> 0
    "zero 4-gram precision is 0": (["the cat sat on a mat"], [["the cat sat in the mat"]]),
    # case-sensitive, whitespace-split (13a would split the comma and the period off)
    "case and tokens as given": (["The cat, sat on the mat."], [["the cat , sat on the mat ."]]),
    # only ASCII whitespace separates words (perl's split on bytes): a no-break space does not
    "no-break space is not a separator": (["a b c d e f"], [["a\u00a0b c d e f"]]),
    # tie in closeness (4 vs 6 words for a 5-word hypothesis): the shorter reference, not the first one
    "closest length tie takes the shorter": (["a b c d e", "x y z w v u"], [["a b c d e f", "a b c d"], ["x y z w v u"]]),
    # clipping by the largest count in one reference; brevity penalty
    "clipping and brevity": (["the the the cat sat on", "one two three"],
                             [["the cat sat on the mat today", "the the cat sat"], ["one two three four five", ""]]),
}


@needs_perl
@pytest.mark.parametrize("case", PERL_CASES)
def test_multi_bleu_agrees_with_the_perl_script(tmp_path, case):
    hypotheses, references = PERL_CASES[case]
    ours = M.multi_bleu(hypotheses, references)
    assert round(ours, 2) == perl_multi_bleu(tmp_path, hypotheses, references)
    # the old definition (sacreBLEU, empty references dropped) gives another figure
    sacre = M.sacrebleu(hypotheses, [[r for r in refs if r] for refs in references])[0]
    assert (abs(sacre - ours) > 1.0) != (case in SAME_AS_SACREBLEU)


def test_multi_bleu_hand_computed():
    # every n-gram of the first hypothesis matches; the second ("a dog") takes the empty reference: r = 6 + 0 < c = 8
    hyps, refs = PERL_CASES["empty reference line counts"]
    assert M.multi_bleu(hyps, refs) == pytest.approx(100.0)
    assert M.multi_bleu(["a b c d"], [["a b c d e"]]) == pytest.approx(100 * 2.718281828459045 ** -0.25)
    assert M.multi_bleu(["a b c x"], [["a b c d"]]) == 0.0
    assert M.multi_bleu([], []) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        M.multi_bleu(["a"], [[]])


def test_dart_task_reports_official_bleu_sacrebleu_ter_and_signatures():
    task = get_task("dart")
    exs = [Example("p", " x", ["Jeff Daniels hosted Saturday Night Live in 1991.", "In 1991, Jeff Daniels hosted SNL."], {}),
           Example("p", " x", ["Alfred N. Phillips was born in Connecticut."], {})]
    predictions = ["jeff daniels hosted saturday night live in 1991 .", "Alfred N. Phillips was born in Connecticut."]
    got = task.score(predictions, exs)
    assert set(got) == {"bleu", "sacrebleu", "ter", "signatures", "num_examples"}
    assert got["bleu"] == pytest.approx(100.0)  # lower-cased and tokenised both sides: identical
    assert got["ter"] == pytest.approx(0.0)
    assert got["sacrebleu"] < 90  # raw text, case-sensitive: the lower-cased tokenised first prediction loses
    assert got["signatures"]["sacrebleu"].startswith("nrefs:var|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert got["signatures"]["ter"].startswith("nrefs:var|case:lc|tok:tercom|norm:no|punct:yes|asian:no|version:")
    assert all(isinstance(got[k], float) for k in ("bleu", "sacrebleu", "ter"))
    assert got == task.score(predictions, exs, split="test")
    # TER (slow) is left out of the evaluations during training
    validation = task.score(predictions, exs, split="validation")
    assert "ter" not in validation and set(validation["signatures"]) == {"sacrebleu"}
    assert validation["bleu"] == got["bleu"] and validation["sacrebleu"] == got["sacrebleu"]


def test_ranked_and_reported_metrics():
    assert official_metrics("dart") == ("bleu",) and reported_metrics("dart") == ("bleu", "sacrebleu", "ter")
    assert official_metrics("samsum") == ("rougeLsum",)
    assert reported_metrics("samsum") == ("rougeLsum", "rouge1", "rouge2", "rougeL")
    assert reported_metrics("mrpc") == official_metrics("mrpc") == ("f1", "accuracy")
    # the extras never enter task_score: TER (lower is better) and sacreBLEU leave it at the official BLEU
    assert selection_score("dart", {"bleu": 40.0, "sacrebleu": 30.0, "ter": 60.0}) == 40.0
    assert selection_score("samsum", {"rougeLsum": 45.0, "rouge1": 50.0, "rouge2": 20.0, "rougeL": 40.0}) == 45.0
    assert selection_score("samsum", {"rouge1": 50.0, "rouge2": 20.0, "rougeL": 40.0}) is None


# ---------------------------------------------------------------------- SAMSum ROUGE-Lsum
SUMMARIES = [  # (reference, prediction): multi-sentence, sentence order differs
    ("Amanda baked cookies. She will bring Jerry some tomorrow.",
     "Amanda will bring Jerry cookies tomorrow. She baked them."),
    ("Olivia and Olivier are voting for liberals in this election. Mr. Smith won't vote!",
     "Mr. Smith won't vote. Olivia and Olivier are voting for liberals."),
]


def test_rouge_lsum_is_summary_level_and_matches_rouge_score_on_newline_joined_sentences():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    for reference, prediction in SUMMARIES:
        got = M.rouge([prediction], [[reference]])
        sentences = "\n".join(M.split_sentences(prediction)), "\n".join(M.split_sentences(reference))
        own = scorer.score(sentences[1], sentences[0])
        assert got["rougeLsum"] == pytest.approx(100 * own["rougeLsum"].fmeasure)
        assert got["rougeL"] == pytest.approx(100 * own["rougeL"].fmeasure)
        assert got["rougeLsum"] > got["rougeL"] + 5
        # without the sentence split rouge_score's rougeLsum is just rougeL: the split is what makes it summary-level
        assert scorer.score(reference, prediction)["rougeLsum"].fmeasure == pytest.approx(own["rougeL"].fmeasure)


def test_rouge_readme_example():
    reference, prediction = SUMMARIES[0]
    got = M.rouge([prediction], [[reference]])
    assert (round(got["rougeL"], 1), round(got["rougeLsum"], 1)) == (55.6, 88.9)  # the figures README quotes


@pytest.mark.parametrize("text, sentences", [
    ("Amanda baked cookies. She will bring Jerry some tomorrow!Really? Yes.",
     ["Amanda baked cookies.", "She will bring Jerry some tomorrow!Really?", "Yes."]),
    ("Mr. Smith met Dr. Brown at 5 p.m. They talked.", ["Mr. Smith met Dr. Brown at 5 p.m.", "They talked."]),
    ('He said "go." Then he left... and cried.', ['He said "go."', "Then he left... and cried."]),
    ("first line\nsecond line. third", ["first line", "second line.", "third"]),
    ("The price is 3.5 dollars.", ["The price is 3.5 dollars."]),
    ("", []),
])
def test_split_sentences(text, sentences):
    assert M.split_sentences(text) == sentences
