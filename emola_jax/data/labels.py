"""FABA's label vocabulary: the emotion classes, the AU sets of each benchmark, the official questions.

The datasets write records in these terms and the scoring reads predictions back in them, so
both import them from here.
"""

from __future__ import annotations

EMOTIONS = ("happiness", "sadness", "surprise", "anger", "neutral", "disgust", "fear")  # label ids 0..6

FABA_AUS = (1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43)
AU_SETS = {
    "au": FABA_AUS,
    "disfa": (1, 2, 4, 6, 9, 12, 25, 26),
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "gft": (1, 2, 4, 6, 10, 12, 14, 15, 23, 24),
}

# what the official evaluation asks, whatever a record's own question says
EMOTION_QUESTION = "What emotions are conveyed by this face?"
AU_QUESTION = "What AUs are conveyed by this face?"
