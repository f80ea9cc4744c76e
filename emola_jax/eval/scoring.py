"""FABA-Bench scoring: recognition (S_re), generation (S_ge) and REGE = S_re + S_ge, in percent.

Two protocols:
- `official` reproduces the official EmoLA evaluation to the digit, quirks included: negative
  sentences are dropped by a *substring* test (so "nose" and "normal" count as negations), the
  emotion is the first class word of the first sentence, else the most frequent over the rest;
  AUs are every `AU(\\d+)` match in a known set; an AU absent (or present) in every target and
  prediction is left out of the mean F1; ROUGE-L is the `rouge` package's summary-level score
  (whitespace tokens, case kept, no stemming).
- `rouge-score` uses Google's `rouge-score` ROUGE-L (lower-cased, tokenised on non-alphanumerics)
  and drops negative sentences only on whole-word negations.

One decision where the official code crashes: when no `.`, `!` or `?` ends a first sentence (the
text has none, or a line break comes before the first one, since the rule's `.` does not match a
newline), the whole text is the first sentence and the rest is empty.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from emola_jax.data.labels import EMOTIONS, FABA_AUS

SYNONYMS = {
    "happiness": ("happiness", "happy", "smiling", "smile", "pleasant", "content", "contentment", "relaxed",
                  "relaxation", "cheerful", "joy", "amusement", "amused", "positivity", "positive",
                  "lightheartedness", "joyful", "friendly", "warmth", "bright"),
    "sadness": ("sadness", "crying", "distress", "concern", "discomfort", "anguish", "somber"),
    "surprise": ("surprise", "surprised", "startled", "puzzled", "astonishment", "disbelief", "wonder", "curiosity",
                 "curious", "confusion", "bewilderment", "skepticism", "excitement", "uncertainty"),
    "anger": ("anger", "mad", "irate", "outraged", "agitation", "irritated", "enraged", "annoyed", "incensed",
              "serious", "frustration", "displeased", "stern"),
    "neutral": ("neutral", "neutrality", "calm", "contemplative", "concerned", "thoughtful", "focused", "solemn",
                "mild"),
    "disgust": ("disgust", "distaste", "disgusted", "discomfort", "displeasure", "displeased", "disapproval",
                "disdain", "contempt"),
    "fear": ("fear", "shock", "anxiety", "apprehension", "tension", "panic", "alertness", "focus", "worry", "alarm",
             "curiosity", "contemplation"),
}
NEGATIONS = ("not", "no", "isn't ", "nothing", "cannot", "won't", "shouldn't", "neither", "nor")
SENTENCE_SPLIT = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")
FIRST_SENTENCE = re.compile(r"^(.*?)[.!?]")
WORD = re.compile(r"\b\w+\b")

RECOGNISED_AUS = frozenset(str(a) for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27, 43))


def _is_negative(sentence: str, protocol: str) -> bool:
    lowered = sentence.lower()
    if protocol == "official":
        return any(word in lowered for word in NEGATIONS)
    words = set(re.findall(r"[a-z']+", lowered))
    return any(word.strip() in words for word in NEGATIONS)


def drop_negative_sentences(text: str, protocol: str = "official") -> str:
    kept = [s for s in SENTENCE_SPLIT.split(text) if not _is_negative(s, protocol)]
    return " ".join(kept) or text


def emotion_of(text: str, protocol: str = "official") -> int:
    """The class id (0..6) a description names, by the official first-sentence-then-counts rule."""
    text = drop_negative_sentences(text, protocol)
    match = FIRST_SENTENCE.match(text)
    first, rest = (match.group(1), FIRST_SENTENCE.sub("", text)) if match else (text, "")
    for word in WORD.findall(first.lower()):
        for class_id, name in enumerate(EMOTIONS):
            if word in SYNONYMS[name]:
                return class_id
    counts = [0] * len(EMOTIONS)
    for word in WORD.findall(rest.lower()):
        for class_id, name in enumerate(EMOTIONS):
            counts[class_id] += word in SYNONYMS[name]
    return max(range(len(EMOTIONS)), key=lambda c: (counts[c], -c))


def has_emotion_word(text: str, protocol: str = "official") -> bool:
    """False when the mapping above fell through to its all-zero default."""
    words = WORD.findall(drop_negative_sentences(text, protocol).lower())
    return any(word in SYNONYMS[name] for word in words for name in EMOTIONS)


def emotion_label(label: int | str) -> int:
    """A label as the official files write it: the id (int or string) or the class name."""
    if isinstance(label, bool):
        raise ValueError(f"emotion label {label!r} is neither an id 0-6 nor a class name")
    if isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
        value = int(label)
        if 0 <= value < len(EMOTIONS):
            return value
    elif isinstance(label, str) and label.strip().lower() in EMOTIONS:
        return EMOTIONS.index(label.strip().lower())
    raise ValueError(f"emotion label {label!r} is neither an id 0-6 nor one of {', '.join(EMOTIONS)}")


def aus_of(text: str) -> set[str]:
    return {a for a in re.findall(r"AU(\d+)", text) if a in RECOGNISED_AUS}


def au_label(label: str) -> set[str]:
    if not isinstance(label, str):
        raise ValueError(f"AU label {label!r} is not a string like '1, 4, 12'")
    return {a for a in label.split(", ") if a}


def au_f1(targets: Sequence[set[str]], predictions: Sequence[set[str]], aus: Sequence[int]) -> dict[str, float]:
    """F1 per AU in percent; an AU whose targets and predictions are all one value is left out,
    as the official code's 1x1 confusion matrix makes it."""
    out = {}
    for au in aus:
        name = str(au)
        t = [name in s for s in targets]
        p = [name in s for s in predictions]
        if len(set(t) | set(p)) < 2:
            continue
        tp = sum(a and b for a, b in zip(t, p, strict=True))
        fp = sum(b and not a for a, b in zip(t, p, strict=True))
        fn = sum(a and not b for a, b in zip(t, p, strict=True))
        if tp == 0:
            out[f"AU{au}"] = 0.0
            continue
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        out[f"AU{au}"] = 100.0 * 2 * precision * recall / (precision + recall)
    return out


def rouge_l(prediction: str, reference: str, protocol: str = "official") -> float | None:
    """ROUGE-L F1 in [0, 1]; None where the official code's `rouge` raises (an empty prediction)."""
    if protocol == "official":
        # deferred: start-up time (rouge)
        from rouge import Rouge

        try:
            return Rouge().get_scores(prediction, reference, avg=True)["rouge-l"]["f"]
        except (ValueError, RecursionError, ZeroDivisionError):
            return None
    # deferred: start-up time (rouge_score)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure


@dataclass(frozen=True)
class Sample:
    prediction: str
    reference: str
    label: int | str


def _generation_score(samples: Sequence[Sample], protocol: str) -> tuple[float, int]:
    scores = [rouge_l(s.prediction, s.reference, protocol) for s in samples]
    valid = [s for s in scores if s is not None]
    return (100.0 * sum(valid) / len(valid) if valid else 0.0), len(scores) - len(valid)


def _labels(samples: Sequence[Sample], parse) -> list:
    if not samples:
        raise ValueError("there are no samples to score")
    out = []
    for index, sample in enumerate(samples):
        try:
            out.append(parse(sample.label))
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from None
    return out


def score_emotion(samples: Sequence[Sample], protocol: str = "official") -> dict:
    labels = _labels(samples, emotion_label)
    predicted = [emotion_of(s.prediction, protocol) for s in samples]
    confusion = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    for t, p in zip(labels, predicted, strict=True):
        confusion[t][p] += 1
    s_re = 100.0 * sum(t == p for t, p in zip(labels, predicted, strict=True)) / len(samples)
    s_ge, rouge_failures = _generation_score(samples, protocol)
    return {
        "protocol": protocol, "task": "emotion", "num_samples": len(samples),
        "s_re": s_re, "s_ge": s_ge, "s_rege": s_re + s_ge, "accuracy": s_re,
        "confusion_matrix": confusion, "classes": list(EMOTIONS),
        "unrecognised_predictions": sum(not has_emotion_word(s.prediction, protocol) for s in samples),
        "rouge_failures": rouge_failures,
    }


def score_au(samples: Sequence[Sample], protocol: str = "official", aus: Sequence[int] = FABA_AUS,
             task: str = "au") -> dict:
    targets = _labels(samples, au_label)
    predicted = [aus_of(s.prediction) for s in samples]
    per_au = au_f1(targets, predicted, aus)
    s_re = sum(per_au.values()) / len(per_au) if per_au else 0.0
    s_ge, rouge_failures = _generation_score(samples, protocol)
    return {
        "protocol": protocol, "task": task, "num_samples": len(samples),
        "s_re": s_re, "s_ge": s_ge, "s_rege": s_re + s_ge, "mean_f1": s_re, "f1_per_au": per_au,
        "aus_scored": len(per_au), "aus_skipped": [f"AU{a}" for a in aus if f"AU{a}" not in per_au],
        "unrecognised_predictions": sum(not p for p in predicted), "rouge_failures": rouge_failures,
    }
