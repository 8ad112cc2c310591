"""Contact sheets: one strip of thumbnails per video, so that a person sees at a glance
why each search hit was chosen. ``draw_sheet`` writes a PNG, or a self-contained HTML page
(thumbnails inlined, no scripts, nothing fetched), for a list of (title, URL) entries."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from video_embeddings.decode import decode_segments
from video_embeddings.frames import WHOLE_VIDEO, Segment
from video_embeddings.outcomes import BadVideo

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["STRIP_H", "SHEET_W", "THUMBNAILS", "Undecodable", "draw_sheet", "read_thumbnails"]


THUMBNAILS = 4
"""Frames per strip, spread from the first to the last frame of the video or segment."""
THUMB_W, THUMB_H = 160, 90
LABEL_W = 320
PAD = 8
STRIP_H = THUMB_H + 2 * PAD
SHEET_W = LABEL_W + THUMBNAILS * (THUMB_W + PAD) + PAD
QUERY_BG = (46, 64, 96)
HIT_BG = (32, 32, 32)
TEXT = (235, 235, 235)
DIM = (150, 150, 150)


class Undecodable(Exception):
    """A video whose frames cannot be read; the message is the one-line reason."""


def read_thumbnails(
    uri: str, count: int = THUMBNAILS, segment: Segment = WHOLE_VIDEO
) -> list[Image.Image]:
    """``count`` frames spread across the video's ``segment`` (by default the whole video),
    sampled and decoded as the UDF samples and decodes them (``decode_segments``: upright,
    any container), RGB, each scaled to fit THUMB_W x THUMB_H. Raises ``Undecodable``
    with the reason when the video cannot be read."""
    from PIL import Image

    try:
        frames = decode_segments(uri, [segment], num_frames=count)[0].permute(0, 2, 3, 1).numpy()
    except FileNotFoundError as e:
        raise Undecodable("object does not exist") from e
    except (BadVideo, ValueError, RuntimeError) as e:
        raise Undecodable(" ".join(str(e).split())) from e  # one log line
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        image.thumbnail((THUMB_W, THUMB_H))
        images.append(image)
    return images


@dataclass(frozen=True)
class _Strip:
    title: str
    uri: str
    thumbnails: list[Image.Image]
    note: str = ""


def _strips(entries: list[tuple[str, str, Segment]]) -> list[_Strip]:
    """A strip per (title, URL, segment); a video that cannot be read any more (deleted
    since it was indexed) gets an empty strip with the reason instead of failing the whole
    sheet."""
    strips = []
    for title, uri, segment in entries:
        try:
            strips.append(_Strip(title, uri, read_thumbnails(uri, segment=segment)))
        except Undecodable as e:
            strips.append(_Strip(title, uri, [], f"unreadable: {e}"))
    return strips


def _name_and_folder(uri: str) -> tuple[str, str]:
    folder, _, name = uri.rstrip("/").rpartition("/")
    return name, folder


def _draw_png(strips: list[_Strip], path: Path) -> None:
    """One STRIP_H-high strip per entry, query first: on the left its rank and score, the
    video's name and its folder; then the thumbnails letterboxed into THUMB_W x THUMB_H
    cells."""
    from PIL import Image, ImageDraw, ImageFont

    sheet = Image.new("RGB", (SHEET_W, STRIP_H * len(strips)), HIT_BG)
    draw = ImageDraw.Draw(sheet)
    big, small = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    for i, strip in enumerate(strips):
        top = i * STRIP_H
        draw.rectangle(
            [0, top, SHEET_W - 1, top + STRIP_H - 1], fill=QUERY_BG if i == 0 else HIT_BG
        )
        name, folder = _name_and_folder(strip.uri)
        lines = [(strip.title, big, TEXT), (_fit(name), small, TEXT), (_fit(folder), small, DIM)]
        if strip.note:
            lines.append((_fit(strip.note), small, TEXT))
        y = top + PAD
        for text, font, colour in lines:
            draw.text((PAD, y), text, fill=colour, font=font)
            y += 22 if font is big else 18
        for j, thumb in enumerate(strip.thumbnails):
            left = LABEL_W + PAD + j * (THUMB_W + PAD)
            draw.rectangle([left, top + PAD, left + THUMB_W - 1, top + PAD + THUMB_H - 1], fill=0)
            offset = ((THUMB_W - thumb.width) // 2, (THUMB_H - thumb.height) // 2)
            sheet.paste(thumb, (left + offset[0], top + PAD + offset[1]))
        draw.line([0, top + STRIP_H - 1, SHEET_W, top + STRIP_H - 1], fill=DIM)
    sheet.save(path, format="PNG")


def _fit(text: str, width: int = 46) -> str:
    """Keep the end of a long label, where the distinguishing part of a path is."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


HTML_STYLE = """
body { background: #202020; color: #ebebeb; font: 14px sans-serif; margin: 0; }
.strip { display: flex; align-items: center; gap: 8px; padding: 8px;
         border-bottom: 1px solid #505050; }
.strip.query { background: #2e4060; }
.label { width: 304px; flex: none; overflow-wrap: anywhere; }
.title { font-size: 16px; font-weight: bold; }
.folder { color: #969696; font-size: 12px; }
.cell { width: 160px; height: 90px; background: #000; display: flex;
        align-items: center; justify-content: center; }
"""


def _write_html(strips: list[_Strip], path: Path) -> None:
    """The same strips as a self-contained page: thumbnails inlined as data URIs, no
    scripts, no external resources."""
    body = []
    for i, strip in enumerate(strips):
        name, folder = _name_and_folder(strip.uri)
        cells = "".join(
            f'<div class="cell"><img src="{_data_uri(t)}" alt="frame {j + 1}"></div>'
            for j, t in enumerate(strip.thumbnails)
        )
        note = f"<div>{html.escape(strip.note)}</div>" if strip.note else ""
        body.append(
            f'<div class="strip{" query" if i == 0 else ""}"><div class="label">'
            f'<div class="title">{html.escape(strip.title)}</div>'
            f"<div>{html.escape(name)}</div>"
            f'<div class="folder">{html.escape(folder)}</div>'
            f"{note}</div>{cells}</div>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>video-embeddings: {html.escape(_name_and_folder(strips[0].uri)[0])}</title>"
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")


def draw_sheet(entries: list[tuple[str, str, Segment]], path: Path) -> None:
    """Write the sheet of (title, URL, segment) entries, each strip drawn from its segment
    (``WHOLE_VIDEO`` for a video), first entry on top and highlighted, as PNG or HTML by
    ``path``'s suffix."""
    strips = _strips(entries)
    if path.suffix.lower() == ".html":
        _write_html(strips, path)
    else:
        _draw_png(strips, path)
