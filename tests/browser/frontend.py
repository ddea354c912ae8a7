"""Driving ComfyUI's own frontend in a real browser (Playwright for Python + Debian's chromium), the
way a user works with the shipped workflows: open one from the template browser, look for the
dialogs that mean trouble, set values, press Run, read what the page shows.

Two frontends are supported, the ones the supported ComfyUI versions ship: 1.27 (ComfyUI 0.3.64:
"Get Started with a Template" -> Custom Nodes -> the pack) and 1.49 (ComfyUI 0.33: sidebar
Templates -> the pack's section). Values are set on the graph's widgets through the page's own
``window.app`` (what typing into each widget ends in); everything else goes through the page.

Only the standard library and playwright: imported by tests/browser.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PACK_SECTION = "ComfyUI-VersaT2I"  # the template browser's section: the pack's folder name
CHROMIUM_ENV = "VERSAT2I_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium)
# No network, no GPU, no first-run UI: the browser only talks to the test server on 127.0.0.1.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage")
# Frontend settings the tests start with (user/default/comfy.settings.json): node text is drawn at
# every zoom level (the level-of-detail switch would draw blank boxes at the zoom that fits a whole
# workflow), so the screenshots are readable.
SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0}


def chromium_executable() -> str | None:
    """The chromium to drive (``$VERSAT2I_CHROMIUM``, else Debian's), or None when there is none."""
    candidate = os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM
    found = shutil.which(candidate) if not os.path.isabs(candidate) else candidate
    return found if found and os.access(found, os.X_OK) else None


def write_settings(base_dir: Path, settings: Mapping[str, Any] = SETTINGS) -> None:
    folder = Path(base_dir) / "user" / "default"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comfy.settings.json").write_text(json.dumps(dict(settings)), encoding="utf-8")


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, poll_s: float = 0.25):
    """``condition()``'s first truthy value within ``timeout`` seconds, else AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


class Frontend:
    """One page of ComfyUI's frontend."""

    def __init__(self, page, server_url: str):
        self.page = page
        self.url = server_url
        self.console: list[str] = []
        self.queued: list[dict] = []  # what the page queued: {"status", "answer", "prompt_id", "prompt"}
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    # -- loading ---------------------------------------------------------------------------------------
    def open(self) -> None:
        self.page.goto(self.url, wait_until="networkidle", timeout=120_000)
        wait_for(lambda: self.page.evaluate("() => !!(window.app && window.app.graph && window.app.canvas)"),
                 timeout=60, what="the frontend's app")
        time.sleep(1)

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window['__COMFYUI_FRONTEND_VERSION__'] || ''") or ""

    def open_template(self, workflow: str) -> None:
        """Open a shipped workflow from the template browser, as a user does: the dialog ComfyUI shows
        on a first visit (0.3.64), else the sidebar's Templates button; then the pack's section and
        the workflow's card."""
        page = self.page
        section = page.get_by_text(PACK_SECTION, exact=True)
        try:  # the dialog a first visit opens (it takes a moment to appear)
            wait_for(lambda: section.first.is_visible(), timeout=15, what="the template dialog of a first visit")
        except AssertionError:
            page.locator("button[aria-label='Templates']").first.click()  # the left sidebar's button
            wait_for(lambda: section.first.is_visible(), timeout=30, what=f"the {PACK_SECTION} template section")
        section.first.click()
        card = page.get_by_text(workflow, exact=True)
        wait_for(lambda: card.first.is_visible(), timeout=30, what=f"the template card {workflow}")
        card.first.click()
        wait_for(lambda: self.page.evaluate(
            "(name) => (window.app.graph._nodes || window.app.graph.nodes || []).some(n => n.type && "
            "n.type.startsWith('VersaT2I_')) ", workflow), timeout=60, what=f"{workflow} to load")
        time.sleep(2)  # the missing-node / missing-model checks run right after loading

    # -- what the page shows ---------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """The texts of visible dialogs and error panels (missing nodes, missing models, missing
        widgets, prompt validation, execution errors): what a user would be stopped by."""
        return self.page.evaluate("""() => {
            const found = [];
            const seen = new Set();
            const selectors = ['.p-dialog', '[role="dialog"]', '[role="alertdialog"]', '.comfy-modal',
                               '[data-testid="error-overlay"]', '.p-toast-message-error', '.p-toast-message-warn'];
            for (const selector of selectors) {
                for (const element of document.querySelectorAll(selector)) {
                    const style = window.getComputedStyle(element);
                    const hidden = style.display === 'none' || style.visibility === 'hidden';
                    if (hidden || !element.offsetParent && style.position !== 'fixed') continue;
                    const text = (element.innerText || '').trim();
                    if (text && !seen.has(text)) { seen.add(text); found.push(text); }
                }
            }
            return found;
        }""")

    def missing_models(self) -> list[str]:
        """The model files the page lists as missing, as ``directory / name``: frontend 1.27's
        Missing Models dialog, or 1.49's error panel (its "View details": the Missing Models list)."""
        details = self.page.locator('[data-testid="error-overlay-see-errors"]')
        if details.count() and details.first.is_visible():
            details.first.click()
            time.sleep(1)
            text = self.page.locator("body").inner_text()
            block = text.split("Missing Models", 1)[1] if "Missing Models" in text else ""
            lines = [line.strip() for line in block.splitlines() if line.strip()]
            # each entry: the file name, then its folder (and buttons)
            return [f"{lines[i + 1]} / {line}" for i, line in enumerate(lines[:-1])
                    if line.endswith((".safetensors", ".pth", ".pt", ".sft"))]
        names = []
        for text in self.problems():
            if "Missing Models" in text:
                names += [line.strip() for line in text.splitlines()
                          if " / " in line and line.strip().endswith((".safetensors", ".pth", ".pt", ".sft"))]
        return names

    # -- values and running ----------------------------------------------------------------------------
    def set_widgets(self, values_by_type: Mapping[str, Mapping[str, Any]]) -> None:
        """Set widget values (by node type and widget name) on the nodes of those types in the loaded
        graph, as typing into each widget does; a widget name such a node lacks is an error."""
        missing = self.page.evaluate("""(values) => {
            const missing = [];
            const nodes = window.app.graph._nodes || window.app.graph.nodes;
            for (const [type, widgets] of Object.entries(values)) {
                for (const node of nodes.filter(n => n.type === type)) {
                    for (const [name, value] of Object.entries(widgets)) {
                        const widget = (node.widgets || []).find(w => w.name === name);
                        if (!widget) { missing.push(type + '.' + name); continue; }
                        widget.value = value;
                        if (widget.callback) widget.callback(value, window.app.canvas, node);
                    }
                }
            }
            window.app.graph.setDirtyCanvas(true, true);
            return missing;
        }""", {k: dict(v) for k, v in values_by_type.items()})
        if missing:
            raise AssertionError(f"not in the loaded workflow: {missing}")

    def replace_in_queued_prompts(self, class_types: Mapping[str, str]) -> None:
        """Rewrite the prompt the page posts: each node of a ``class_types`` key becomes its value (a
        test-only stand-in with the same inputs and outputs)."""
        def handle(route):
            request = route.request
            if request.method != "POST":
                return route.continue_()
            body = json.loads(request.post_data or "{}")
            for node in (body.get("prompt") or {}).values():
                node["class_type"] = class_types.get(node.get("class_type"), node.get("class_type"))
            return route.continue_(post_data=json.dumps(body))

        self.page.route("**/prompt", handle)

    def press_run(self) -> dict:
        """Press the Run button of the top bar (frontend 1.49: ``queue-button``; 1.27: "Run") and
        return what the server answered the page (``status``, ``answer`` with the ``prompt_id``)."""
        def is_queue_post(response) -> bool:
            return response.url.endswith("/prompt") and response.request.method == "POST"

        with self.page.expect_response(is_queue_post, timeout=60_000) as posted:
            self.page.locator('[data-testid="queue-button"], button[aria-label="Run"]').first.click()
        response = posted.value
        answer = response.json()
        queued = {"status": response.status, "answer": answer, "prompt_id": answer.get("prompt_id"),
                  "prompt": json.loads(response.request.post_data or "{}").get("prompt")}
        self.queued.append(queued)
        return queued

    def fit_view(self, *, margin: float = 24, left: float = 72, top: float = 96) -> None:
        """Zoom and pan so the whole workflow (nodes and groups) fills the canvas, clear of the
        sidebar (``left``) and the top bar (``top``): what the frontend's fit-view does, but with the
        overlays left out of the area."""
        self.page.evaluate("""([margin, left, top]) => {
            const canvas = window.app.canvas;
            const nodes = window.app.graph._nodes || window.app.graph.nodes;
            const groups = window.app.graph._groups || window.app.graph.groups || [];
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            for (const node of nodes) {
                const title = window.LiteGraph ? window.LiteGraph.NODE_TITLE_HEIGHT : 30;
                x0 = Math.min(x0, node.pos[0]); y0 = Math.min(y0, node.pos[1] - title);
                x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
            }
            for (const group of groups) {
                const [gx, gy, gw, gh] = group._bounding || group.bounding;
                x0 = Math.min(x0, gx); y0 = Math.min(y0, gy); x1 = Math.max(x1, gx + gw); y1 = Math.max(y1, gy + gh);
            }
            const width = canvas.canvas.clientWidth - left - 2 * margin;
            const height = canvas.canvas.clientHeight - top - 2 * margin;
            const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1.0);
            canvas.ds.scale = scale;
            canvas.ds.offset[0] = (left + margin) / scale - x0 + (width / scale - (x1 - x0)) / 2;
            canvas.ds.offset[1] = (top + margin) / scale - y0;
            canvas.setDirty(true, true);
        }""", [margin, left, top])
        time.sleep(1)

    def screenshot(self, path: Path, *, quality: int = 70) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), type="jpeg", quality=quality)
        return path
