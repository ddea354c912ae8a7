"""Thumbnails of UI-format workflows: a diagram of the graph (groups, nodes, typed links) drawn with
Pillow, so they can be regenerated anywhere without a browser.

ComfyUI's template browser (frontend 1.27, ComfyUI 0.3.64) shows a custom-node template
``workflows/<name>.json`` with the image ``/api/workflow_templates/<pack folder>/<name>.jpg``: a
JPEG of the same name next to it. Each thumbnail carries the SHA-256 of the workflow file it was
drawn from in its JPEG comment, so a test can tell when a workflow changed without a new
thumbnail (tests/unit/test_workflows_schema.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

SIZE = 768  # output pixels (square, like the core templates' thumbnails)
SUPERSAMPLE = 2  # drawn larger, then downscaled: smooth curves without an antialiasing API
BANNER = 118  # output pixels at the top for the title
MARGIN = 18
TITLE_HEIGHT = 30  # litegraph title bar, above a node's pos
COMMENT_PREFIX = "versat2i-workflow-sha256:"

BACKGROUND = (32, 33, 36)
GRID = (44, 46, 50)
NODE_BODY = (58, 58, 60)
NODE_TITLE = (40, 40, 42)
NODE_OUTLINE = (16, 16, 16)
TEXT = (235, 235, 235)
MUTED_TEXT = (160, 160, 160)
# The dark palette's slot colours (ComfyUI frontend), so the diagram reads like the canvas.
LINK_COLORS = {"MODEL": "#B39DDB", "CLIP": "#FFD500", "VAE": "#FF6E6E", "CONDITIONING": "#FFA931",
               "LATENT": "#FF9CF9", "IMAGE": "#64B5F6", "MASK": "#81C784", "STRING": "#7FD1B9", "INT": "#AAAAAA",
               "FLOAT": "#AAAAAA", "COMBO": "#C8C8C8", "VERSAT2I_SCORERS": "#F49AC2",
               "VERSAT2I_SCORES": "#E57373", "VERSAT2I_SELECTION": "#FFB74D", "VERSAT2I_CANDIDATES": "#4DD0E1"}
DEFAULT_LINK = "#9A9A9A"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def thumbnail_path(workflow_path: Path) -> Path:
    return Path(workflow_path).with_suffix(".jpg")


def recorded_sha256(thumbnail: Path) -> str | None:
    """The workflow hash a thumbnail was drawn from (None if it carries none)."""
    with Image.open(thumbnail) as image:
        comment = image.info.get("comment", b"")
    text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    return text[len(COMMENT_PREFIX):] if text.startswith(COMMENT_PREFIX) else None


def _rgb(color: str | None, fallback=(90, 90, 90)) -> tuple[int, int, int]:
    if not color:
        return fallback
    color = color.lstrip("#")
    if len(color) == 3:
        color = "".join(c * 2 for c in color)
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))


def _font(size: float) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, round(size)))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels (a last too-long word is cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [_fit(draw, line, font, width) for line in lines]


def workflow_title(workflow: Mapping[str, Any], fallback: str) -> str:
    """The first Markdown heading of the workflow's notes, else ``fallback``."""
    for node in workflow.get("nodes", []):
        if node.get("type") in ("MarkdownNote", "Note"):
            for line in str((node.get("widgets_values") or [""])[0]).splitlines():
                match = re.match(r"#+\s+(.*)", line.strip())
                if match:
                    return match.group(1).strip()
    return fallback


def node_title(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> str:
    if node.get("title"):
        return str(node["title"])
    if node.get("type") in ("MarkdownNote", "Note"):
        return "Note"
    spec = definitions.get(node.get("type"), {})
    return str(spec.get("display_name") or node.get("type"))


def _bounds(workflow: Mapping[str, Any]) -> tuple[float, float, float, float]:
    boxes = [tuple(g["bounding"]) for g in workflow.get("groups", [])]
    boxes += [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT)
              for n in workflow.get("nodes", [])]
    left = min(b[0] for b in boxes)
    top = min(b[1] for b in boxes)
    right = max(b[0] + b[2] for b in boxes)
    bottom = max(b[1] + b[3] for b in boxes)
    return left, top, right, bottom


def _slot_y(node: Mapping[str, Any], index: int, *, output: bool) -> float:
    """Canvas y of an input / output slot: sockets in rows of 20 px; a widget input sits on its
    widget (approximated as rows of 24 px after the sockets)."""
    top = node["pos"][1]
    if output:
        return top + 10 + 20 * index
    inputs = node.get("inputs") or []
    sockets = [i for i in inputs if not i.get("widget")]
    if not inputs[index].get("widget"):
        return top + 10 + 20 * sockets.index(inputs[index])
    rows = max(len(sockets), len(node.get("outputs") or []))
    widget_index = [i for i in inputs if i.get("widget")].index(inputs[index])
    return min(top + node["size"][1] - 8, top + 20 * rows + 16 + 24 * widget_index)


def render(workflow: Mapping[str, Any], definitions: Mapping[str, Any], *, title: str,
           subtitle: str = "ComfyUI-VersaT2I") -> Image.Image:
    scale_out = SUPERSAMPLE
    width = height = SIZE * scale_out
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image, "RGBA")
    for x in range(0, width, 24 * scale_out):  # the canvas' dotted grid
        for y in range(BANNER * scale_out, height, 24 * scale_out):
            draw.point((x, y), fill=GRID)

    left, top, right, bottom = _bounds(workflow)
    area_w = width - 2 * MARGIN * scale_out
    area_h = height - (BANNER + 2 * MARGIN) * scale_out
    scale = min(area_w / (right - left), area_h / (bottom - top))
    offset_x = MARGIN * scale_out + (area_w - (right - left) * scale) / 2 - left * scale
    offset_y = (BANNER + MARGIN) * scale_out + (area_h - (bottom - top) * scale) / 2 - top * scale

    def to_px(x: float, y: float) -> tuple[float, float]:
        return offset_x + x * scale, offset_y + y * scale

    # Groups: translucent areas (their titles are drawn last, over the nodes: at thumbnail scale
    # the canvas' title room is a few pixels).
    group_font = _font(14 * scale_out)
    for group in workflow.get("groups", []):
        x, y, w, h = group["bounding"]
        (x0, y0), (x1, y1) = to_px(x, y), to_px(x + w, y + h)
        color = _rgb(group.get("color"))
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6 * scale_out, fill=(*color, 55), outline=(*color, 220),
                               width=scale_out)

    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    # Links under the nodes: cubic curves from output to input, in the type's colour.
    for link in workflow.get("links", []):
        _, origin_id, origin_slot, target_id, target_slot, link_type = link[:6]
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            continue
        start = to_px(origin["pos"][0] + origin["size"][0], _slot_y(origin, origin_slot, output=True))
        end = to_px(target["pos"][0], _slot_y(target, target_slot, output=False))
        pull = max(40 * scale_out, abs(end[0] - start[0]) * 0.45)
        points = []
        for step in range(41):
            t = step / 40
            a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
            points.append((a * start[0] + b * (start[0] + pull) + c * (end[0] - pull) + d * end[0],
                           a * start[1] + b * start[1] + c * end[1] + d * end[1]))
        muted = origin.get("mode", 0) == 2 or target.get("mode", 0) == 2
        color = _rgb(LINK_COLORS.get(str(link_type), DEFAULT_LINK))
        draw.line(points, fill=(*color, 70 if muted else 170), width=max(2, round(1.8 * scale_out)), joint="curve")

    # Nodes: body, title bar, title; notes in their own colour with their first lines.
    # Text as large as the scaled title bar allows, within what stays legible at thumbnail size.
    title_font = _font(min(14.0, max(9.5, 0.55 * TITLE_HEIGHT * scale / scale_out)) * scale_out)
    note_size = min(11.0, max(8.0, 0.4 * TITLE_HEIGHT * scale / scale_out))
    note_font = _font(note_size * scale_out)
    for node in workflow.get("nodes", []):
        x, y = node["pos"]
        w, h = node["size"]
        (x0, y0), (x1, y1) = to_px(x, y - TITLE_HEIGHT), to_px(x + w, y + h)
        title_bottom = to_px(x, y)[1]
        muted = node.get("mode", 0) == 2
        alpha = 110 if muted else 255
        is_note = node.get("type") in ("MarkdownNote", "Note")
        body = _rgb(node.get("bgcolor"), NODE_BODY)
        head = _rgb(node.get("color"), NODE_TITLE)
        radius = 5 * scale_out
        draw.rounded_rectangle((x0, y0, x1, y1), radius=radius, fill=(*body, alpha), outline=(*NODE_OUTLINE, alpha),
                               width=scale_out)
        draw.rounded_rectangle((x0, y0, x1, max(title_bottom, y0 + 2 * radius)), radius=radius, fill=(*head, alpha))
        name = node_title(node, definitions)
        draw.text((x0 + 5 * scale_out, y0 + 2 * scale_out), _fit(draw, name, title_font, x1 - x0 - 10 * scale_out),
                  font=title_font, fill=TEXT if not muted else MUTED_TEXT)
        if is_note:
            lines = [re.sub(r"[*`#]", "",
                            line).strip() for line in str((node.get("widgets_values") or [""])[0]).splitlines()]
            text_y = title_bottom + 4 * scale_out
            for line in [line for line in lines if line][:40]:
                if text_y + (note_size + 2) * scale_out > y1:
                    break
                draw.text((x0 + 5 * scale_out, text_y), _fit(draw, line, note_font, x1 - x0 - 10 * scale_out),
                          font=note_font, fill=(230, 220, 200))
                text_y += (note_size + 2) * scale_out
        for index, entry in enumerate(node.get("outputs") or []):  # slot dots in the type's colour
            cx, cy = to_px(x + w, _slot_y(node, index, output=True))
            color = _rgb(LINK_COLORS.get(str(entry.get("type")), DEFAULT_LINK))
            draw.ellipse((cx - 3 * scale_out, cy - 3 * scale_out, cx + 3 * scale_out, cy + 3 * scale_out),
                         fill=(*color, alpha))
        for index, entry in enumerate(node.get("inputs") or []):
            if entry.get("link") is None:
                continue
            cx, cy = to_px(x, _slot_y(node, index, output=False))
            color = _rgb(LINK_COLORS.get(str(entry.get("type")), DEFAULT_LINK))
            draw.ellipse((cx - 3 * scale_out, cy - 3 * scale_out, cx + 3 * scale_out, cy + 3 * scale_out),
                         fill=(*color, alpha))

    for group in workflow.get("groups", []):
        x, y, w, _h = group["bounding"]
        (x0, y0), (x1, _y1) = to_px(x, y), to_px(x + w, y)
        color = _rgb(group.get("color"))
        line = _fit(draw, group["title"], group_font, x1 - x0 - 12 * scale_out)
        draw.rounded_rectangle((x0, y0, x1, y0 + 22 * scale_out), radius=6 * scale_out,
                               fill=(*[c // 3 for c in color], 235))
        draw.text((x0 + 6 * scale_out, y0 + 3 * scale_out), line, font=group_font, fill=TEXT)

    # Banner.
    draw.rectangle((0, 0, width, BANNER * scale_out), fill=(24, 25, 28))
    draw.rectangle((0, BANNER * scale_out - 3 * scale_out, width, BANNER * scale_out), fill=(*_rgb("#b58b2a"), 255))
    heading = _font(34 * scale_out)
    draw.text((MARGIN * scale_out, 20 * scale_out), _fit(draw, title, heading, width - 2 * MARGIN * scale_out),
              font=heading, fill=TEXT)
    draw.text((MARGIN * scale_out, 72 * scale_out), subtitle, font=_font(18 * scale_out), fill=(190, 190, 190))
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def write_thumbnail(workflow_path: Path, definitions: Mapping[str, Any]) -> Path:
    """Render ``<name>.jpg`` next to ``<name>.json``, recording the workflow's hash in the JPEG comment."""
    workflow_path = Path(workflow_path)
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    title = workflow_title(workflow, workflow_path.stem.replace("_", " "))
    image = render(workflow, definitions, title=title)
    target = thumbnail_path(workflow_path)
    comment = (COMMENT_PREFIX + file_sha256(workflow_path)).encode("ascii")
    image.save(target, "JPEG", quality=88, optimize=True, comment=comment)
    return target
