"""FABA-Bench scoring: the official rules on hand-worked cases, ROUGE against the packages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emola_jax.eval import scoring
from emola_jax.eval.report import read_prediction_lines, read_predictions, score, write_report

ROOT = Path(__file__).resolve().parent.parent
H, S, SU, A, N, D, F = range(7)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The person looks happy and relaxed.", H),
        # word order in the first sentence decides, not list order
        ("She seems focused and curious.", N),
        ("She seems curious and focused.", SU),
        # no class word in the first sentence: counts over the rest
        ("A face is shown. It shows anger and frustration, with some sadness.", A),
        # ties go to the earliest class in the order happiness, sadness, surprise, anger, neutral, disgust, fear
        ("A face. Concern and a smile.", H),
        ("A face. Stern distaste.", A),
        ("A face. Some discomfort.", S),  # discomfort is in sadness and disgust
        ("A face. Nothing to report", H),  # all zero
        # substring negation: "nose" contains "no", so that sentence is dropped
        ("The face shows a calm look. Her nose wrinkles with disgust.", N),
        # every sentence negative: the original text is used
        ("Her nose is wrinkled in disgust.", D),
        ("The person is not happy. They look sad and somber.", S),
        ("Isn't she happy? She shows anxiety.", F),  # "isn't " with its space; the split keeps "?"
        # no sentence end: the whole text is the first sentence (the official code would crash)
        ("happy face", H),
    ],
)
def test_official_emotion_mapping(text, expected):
    assert scoring.emotion_of(text, "official") == expected


def test_rouge_score_protocol_negation_is_whole_word():
    text = "The face shows a calm look. Her nose wrinkles with disgust."
    assert scoring.emotion_of(text, "official") == N
    assert scoring.emotion_of(text, "rouge-score") == N  # first sentence still decides
    assert scoring.drop_negative_sentences(text, "rouge-score") == text
    assert scoring.drop_negative_sentences(text, "official") == "The face shows a calm look."


def test_emotion_labels():
    assert [scoring.emotion_label(x) for x in (3, "3", "Anger", "fear ")] == [A, A, A, F]
    for bad in (7, "angry", None, True):
        with pytest.raises(ValueError, match="emotion label"):
            scoring.emotion_label(bad)


def test_au_parsing():
    assert scoring.aus_of("AU1, AU06, AU18 and AU12; AU43 and AU4") == {"1", "12", "43", "4"}
    assert scoring.aus_of("The brows are not raised (AU2).") == {"2"}  # negation does not matter for AUs
    assert scoring.au_label("1, 4, 12") == {"1", "4", "12"}


def test_au_f1_hand_worked():
    targets = [{"1", "4"}, {"1", "4"}, {"4"}, {"4"}]
    preds = [{"1", "2", "4"}, {"4"}, {"1", "4"}, {"4"}]
    per_au = scoring.au_f1(targets, preds, (1, 2, 4, 5))
    # AU1: TP 1, FP 1, FN 1 -> 50; AU2: only FP -> 0; AU4 always present, AU5 never: skipped
    assert per_au == {"AU1": 50.0, "AU2": 0.0}
    metrics = scoring.score_au([scoring.Sample(p, "ref", ", ".join(sorted(t))) for t, p in zip(
        targets, ["AU1 AU2 AU4", "AU4", "AU1 AU4", "AU4"], strict=True)], aus=(1, 2, 4, 5))
    assert metrics["s_re"] == 25.0 and metrics["aus_skipped"] == ["AU4", "AU5"]


def test_rouge_l_against_both_packages():
    from rouge import Rouge
    from rouge_score import rouge_scorer

    pred, ref = "The Cat sat on a mat.", "the cat sat on a mat."
    # summary-level LCS on whitespace tokens, case kept: "sat on a mat" -> 4 of 6 tokens each way
    assert scoring.rouge_l(pred, ref, "official") == pytest.approx(4 / 6, abs=1e-6)
    # the package counts the reference's words as a set: "the" twice counts once (R = 4/5, P = 4/6)
    assert scoring.rouge_l("The Cat sat on the mat", "the cat sat on the mat") == pytest.approx(8 / 11, abs=1e-6)
    assert scoring.rouge_l(pred, ref, "official") == pytest.approx(
        Rouge().get_scores(pred, ref, avg=True)["rouge-l"]["f"], abs=1e-12)
    assert scoring.rouge_l(pred, ref, "rouge-score") == pytest.approx(1.0)
    assert scoring.rouge_l(pred, ref, "rouge-score") == pytest.approx(
        rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure)
    assert scoring.rouge_l("", ref, "official") is None  # the rouge package raises on an empty hypothesis


def test_emotion_metrics_and_report(tmp_path):
    samples = [
        scoring.Sample("The person looks happy.", "The person looks happy.", 0),
        scoring.Sample("The person looks happy.", "The person is sad.", "Sadness"),
        scoring.Sample("", "An angry face.", "3"),
    ]
    metrics = score(samples, "emotion")
    assert metrics["s_re"] == pytest.approx(100 / 3)
    assert metrics["rouge_failures"] == 1
    assert metrics["confusion_matrix"][1][0] == 1 and metrics["confusion_matrix"][3][0] == 1
    assert metrics["unrecognised_predictions"] == 1
    expected_ge = 100 * (1.0 + scoring.rouge_l(samples[1].prediction, samples[1].reference)) / 2
    assert metrics["s_ge"] == pytest.approx(expected_ge)
    assert metrics["s_rege"] == pytest.approx(metrics["s_re"] + metrics["s_ge"])
    report = write_report(tmp_path, metrics)
    assert "| EmoLA (paper) | 64.50 | 31.70 | 96.20 |" in report.read_text()
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_predictions_cli(tmp_path):
    lines = [
        {"prediction": "AU1 and AU12 are active.", "reference": "AU1 and AU12.", "label": "1, 12"},
        {"prediction": "AU4 is active.", "reference": "AU1 is active.", "label": "1"},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "evaluate", "--predictions", str(path),
                             "--task", "au", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # AU1: TP 1, FN 1 -> P 1, R .5 -> 66.67; AU4: FP only -> 0; AU12: TP 1 -> 100; others skipped
    assert metrics["f1_per_au"] == pytest.approx({"AU1": 200 / 3, "AU4": 0.0, "AU12": 100.0})
    assert metrics["s_re"] == pytest.approx((200 / 3 + 100) / 3)
    assert (tmp_path / "out" / "f1_per_au.png").exists()

    path.write_text(json.dumps(lines[0]) + "\n{broken\n")
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "evaluate", "--predictions", str(path),
                             "--task", "au", "--out", str(tmp_path / "out2")], capture_output=True, text=True)
    assert result.returncode == 1 and "line 2" in result.stderr


def test_malformed_lines_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prediction": "x", "reference": "y", "label": 1}\n{"prediction": "x"}\n')
    with pytest.raises(ValueError, match="line 2: missing reference, label"):
        read_predictions(path)


def test_one_reader_for_a_finished_file_and_one_being_appended(tmp_path):
    """Scoring reads every line, the last one even without its newline; an evaluation resuming
    its own file leaves out a last line a kill cut short, and a missing file holds nothing yet."""
    path = tmp_path / "p.jsonl"
    line = {"id": "a", "prediction": "x", "reference": "y", "label": 1}
    path.write_text(json.dumps(line) + "\n\n" + json.dumps({**line, "id": "b"}))
    assert [s.prediction for s in read_predictions(path)] == ["x", "x"]
    assert read_prediction_lines(path, appended=True) == [line]
    assert read_prediction_lines(tmp_path / "absent.jsonl", appended=True) == []
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path / "absent.jsonl")
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no predictions"):
        read_predictions(path)
