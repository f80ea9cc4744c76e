"""What the model's two answers about a face say, and how a face and its reading are drawn: shared by
the photo analysis, the video analysis and the server, so that a face reads and looks the same in each."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from emola_jax.atomic import atomic_file
from emola_jax.data import labels
from emola_jax.eval import scoring

QUESTIONS = {"emotion": labels.EMOTION_QUESTION, "au": labels.AU_QUESTION}
BOX_COLOUR = (255, 64, 32)


def reading(emotion_answer: tuple[str, bool], au_answer: tuple[str, bool], seconds: float) -> dict:
    """What the official scoring reads from the two answers (`scoring.emotion_of`, `scoring.aus_of`).
    The official rule falls back to class 0 when no emotion word is found: `emotion_named` says
    whether one was."""
    return {"emotion": labels.EMOTIONS[scoring.emotion_of(emotion_answer[0])],
            "emotion_named": scoring.has_emotion_word(emotion_answer[0]),
            "aus": [f"AU{n}" for n in sorted(scoring.aus_of(au_answer[0]), key=int)],
            "emotion_answer": emotion_answer[0], "au_answer": au_answer[0],
            "answers_complete": emotion_answer[1] and au_answer[1], "answer_seconds": round(seconds, 4)}



def emotion_shown(answer: dict) -> str:
    """The emotion the official rule reads, marked where it is its fallback (no emotion word in the
    answer): one text for the picture and the page, as `results.jsonl` has it (`emotion_named`)."""
    return answer["emotion"] if answer["emotion_named"] else f"{answer['emotion']} (fallback: no emotion named)"


def label_text(answer: dict) -> str:
    return f"{emotion_shown(answer)}; {' '.join(answer['aus']) or 'no AUs'}"


LABEL_MIN_PX = 8  # the smallest label font; a label that does not fit at it is wrapped


@dataclasses.dataclass(frozen=True)
class Label:
    font: ImageFont.FreeTypeFont
    text: str  # wrapped onto lines where it must be
    box: tuple[int, int, int, int]  # the filled background, [left, top, right, bottom] pixels, inside the photo
    origin: tuple[int, int]  # where the text is drawn


def line_width(size: tuple[int, int]) -> int:
    return max(2, round(max(size) / 400))


def layout_label(text: str, size: tuple[int, int], face_box: tuple[int, int, int, int]) -> Label:
    """Where and how large a face's label is drawn on a photo of `size` (width, height) pixels: the
    font 1/60 of the photo's longer side (at least 12 px), smaller until the label fits the photo's
    width (down to `LABEL_MIN_PX`), then wrapped onto lines; above the face's box where there is
    room, else below it, else over its top, always inside the photo."""
    width, height = size
    line = line_width(size)
    room = width - 2 * line
    font_px = max(12, round(max(size) / 60))
    font = ImageFont.load_default(size=font_px)
    while font_px > LABEL_MIN_PX and font.getlength(text) > room:
        font_px = max(LABEL_MIN_PX, min(font_px - 1, int(font_px * room / font.getlength(text))))
        font = ImageFont.load_default(size=font_px)
    if font.getlength(text) > room:  # wrapped at words
        lines = [""]
        for word in text.split():
            joined = f"{lines[-1]} {word}".strip()
            if lines[-1] and font.getlength(joined) > room:
                lines.append(word)
            else:
                lines[-1] = joined
        text = "\n".join(lines)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = probe.multiline_textbbox((0, 0), text, font=font)
    box_width, box_height = min(x1 - x0 + 2 * line, width), min(y1 - y0 + 2 * line, height)
    left, top, _, bottom = face_box
    x = max(0, min(left, width - box_width))
    if top - box_height >= 0:
        y = top - box_height
    elif bottom + line + box_height <= height:
        y = bottom + line
    else:
        y = max(0, min(top, height - box_height))
    return Label(font, text, (x, y, x + box_width - 1, y + box_height - 1), (x + line - x0, y + line - y0))


def draw_faces(canvas: Image.Image, boxes, texts) -> None:
    """Each box `(left, top, right, bottom)` outlined on `canvas`, then its text in a label above it
    (`layout_label`): every box first, so that no box is drawn over a label."""
    draw = ImageDraw.Draw(canvas)
    line = line_width(canvas.size)
    for box in boxes:
        draw.rectangle(box, outline=BOX_COLOUR, width=line)
    for box, text in zip(boxes, texts, strict=True):
        label = layout_label(text, canvas.size, box)
        draw.rectangle(label.box, fill=BOX_COLOUR)
        draw.multiline_text(label.origin, label.text, fill=(255, 255, 255), font=label.font)


def save_png(image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # 3x faster than PIL's default 6, 12 % larger
    with atomic_file(path) as staging:
        staging.write_bytes(buffer.getvalue())


