#!/usr/bin/env python3
"""Screenshots of a run's TensorBoard: the scalars, the image grids and the latent usage heatmap.

Starts `tensorboard --logdir RUN_DIR/tensorboard --host 127.0.0.1 --port P` (the `tensorboard` next to
the running Python), waits until it has loaded the run, opens its dashboards in headless Chromium
(Debian's `chromium` package), driven through the DevTools protocol with the standard library only,
and writes PNGs to --out: the scalars and images dashboards, and the latent usage heatmaps close up.
TensorBoard and Chromium are stopped on every way out.
Run on demand (the README's screenshots are made with it); no test runs it.

    .venv/bin/python -m launch.cli demo --out runs/shot --steps 400 --images 2000
    .venv/bin/python scripts/screenshot_tensorboard.py runs/shot/run --out docs/
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
MAX_PNG_BYTES = 400 * 1024


@dataclass(frozen=True)
class Shot:
    """One dashboard to capture: its file name, the URL fragment, what must be on the page first."""

    name: str
    fragment: str
    ready: str
    """A JavaScript expression over `deep(selector)` (every element matching it, shadow roots
    included) that is true once the dashboard has drawn its data."""
    clip: str
    """A JavaScript expression giving the part of the page to keep, [x, y, width, height] in CSS pixels."""
    width: int
    height: int
    """The browser window, CSS pixels."""
    scale: float
    """Device pixels per CSS pixel."""
    what: str


# Legacy (Polymer) dashboards, chosen by URL fragment: every scalar chart is a tf-scalar-card holding a
# vz-line-chart2, every image a tf-image-loader with an <img> in its shadow root. One tag filter per
# dashboard puts the chosen tags in one category, the first tf-category-paginated-view (12 cards a page;
# the categories of the tags' prefixes follow it, repeating them, and are cut off).
IMAGES_LOADED = ("deep('tf-image-loader').length > 0 && deep('tf-image-loader').every(l => {"
                 " const i = l.shadowRoot && l.shadowRoot.querySelector('#main-image-container img');"
                 " return i && i.complete && i.naturalWidth > 0; })")
FIRST_CATEGORY = ("(() => { const r = deep('tf-category-paginated-view')[0].getBoundingClientRect();"
                  " return [0, 0, window.innerWidth, Math.min(window.innerHeight, r.bottom + 16)]; })()")
IMAGE_CARDS = ("(() => { const c = deep('tf-category-paginated-view')[0].getBoundingClientRect();"
               " const r = deep('tf-image-loader').map(e => e.getBoundingClientRect())"
               ".filter(q => q.width > 0 && q.top >= c.top && q.bottom <= c.bottom);"
               " const x = Math.min(...r.map(q => q.left)) - 12, y = Math.min(...r.map(q => q.top)) - 12;"
               " return [x, y, Math.max(...r.map(q => q.right)) + 12 - x,"
               " Math.max(...r.map(q => q.bottom)) + 12 - y]; })()")


def shots(width: int, text: bool) -> list[Shot]:
    listed = [
        Shot("tensorboard.png",
             "scalars&_smoothingWeight=0&tagFilter=" + urllib.parse.quote(
                 "^(train/(elbo|bpd|distortion|rate|grad_norm|lr)|latents/)"),
             "deep('tf-scalar-card').length > 0 && "
             "deep('vz-line-chart2').length === deep('tf-scalar-card').length",
             FIRST_CATEGORY, width, 1330, 1.0,
             "scalars dashboard: ELBO, bits/dim, distortion, rate, gradient norm, lr; latent rate per "
             "resolution, active groups"),
        Shot("tensorboard-images.png", "images&tagFilter=" + urllib.parse.quote("."), IMAGES_LOADED,
             FIRST_CATEGORY, width, 1000, 1.0,
             "images dashboard: latents/usage and eval_latents/usage heatmaps, reconstruction and sample grids"),
        Shot("tensorboard-latents.png", "images&tagFilter=" + urllib.parse.quote("latents/usage$"),
             IMAGES_LOADED, IMAGE_CARDS, width, 700, 2.0,
             "images dashboard, close-up at 2x: the latents/usage and eval_latents/usage heatmaps"),
    ]
    if text:
        listed.append(Shot("tensorboard-text.png", "text&tagFilter=" + urllib.parse.quote("."),
                           "deep('tf-text-loader').length > 0 && deep('tf-text-loader').every("
                           "l => l.shadowRoot && l.shadowRoot.querySelector('tf-markdown-view'))",
                           FIRST_CATEGORY, width, 900, 1.0, "text dashboard: the run's config"))
    return listed


DEEP_JS = """
window.deep = function(selector) {
  const out = [];
  const walk = (root) => {
    root.querySelectorAll(selector).forEach(e => out.push(e));
    root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); });
  };
  walk(document);
  return Array.from(new Set(out));
};
"""


class Failure(Exception):
    """A failure with a message for the person running the script."""


# --- a minimal WebSocket client (RFC 6455), enough for Chromium's DevTools protocol ---

class WebSocket:
    def __init__(self, url: str, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Failure("Chromium closed the DevTools connection during the handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise Failure(f"DevTools websocket handshake refused: {head.decode(errors='replace')}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise Failure("Chromium closed the DevTools connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise Failure("Chromium closed the DevTools connection")
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self.sock.close()


class DevTools:
    """Commands to one page target; events are read and dropped."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.next_id = 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise Failure(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            return None
        return result.get("result", {}).get("value")


# --- processes ---

def find_chromium(explicit: str | None) -> str:
    if explicit:
        if shutil.which(explicit):
            return shutil.which(explicit)
        raise Failure(f"--chromium {explicit}: not found")
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    raise Failure("Chromium is not installed: run `apt-get install chromium` (Debian's package; as root, "
                  "or with sudo), or pass --chromium PATH")


def find_tensorboard() -> str:
    beside = Path(sys.executable).parent / "tensorboard"
    if beside.exists():
        return str(beside)
    raise Failure(f"no `tensorboard` next to {sys.executable}: run this script with the project's "
                  "environment (.venv/bin/python)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_tensorboard(base: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until TensorBoard answers and has read scalars and images from the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failure(f"tensorboard exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, ValueError):
            scalars = get_json(f"{base}/data/plugin/scalars/tags")
            images = get_json(f"{base}/data/plugin/images/tags")
            if any(scalars.values()) and any(images.values()):
                return
        time.sleep(0.5)
    raise Failure(f"tensorboard did not show the run's scalars and images within {timeout:.0f} s "
                  f"(is there an events file under the log folder?):\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def devtools_port(profile: Path, process: subprocess.Popen, timeout: float) -> int:
    """Chromium writes the port it chose (--remote-debugging-port=0) to DevToolsActivePort."""
    path = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failure(f"chromium exited with status {process.returncode} before it opened DevTools")
        if path.exists():
            lines = path.read_text().split()
            if lines:
                return int(lines[0])
        time.sleep(0.2)
    raise Failure(f"chromium did not open its DevTools port within {timeout:.0f} s")


# --- capturing ---

def capture(page: DevTools, base: str, shot: Shot, timeout: float, settle: float) -> bytes:
    page("Emulation.setDeviceMetricsOverride", width=shot.width, height=shot.height,
         deviceScaleFactor=shot.scale, mobile=False)
    # a new document per dashboard: TensorBoard reads the fragment (dashboard, tag filter) as it starts
    page("Page.navigate", url="about:blank")
    page("Page.navigate", url=f"{base}/#{shot.fragment}")
    deadline = time.monotonic() + timeout
    while True:
        page.evaluate(DEEP_JS)
        if page.evaluate(f"document.readyState === 'complete' && !!({shot.ready})"):
            break
        if time.monotonic() > deadline:
            raise Failure(f"{shot.name}: TensorBoard's #{shot.fragment.split('&')[0]} dashboard did not draw "
                          f"within {timeout:.0f} s (waited for: {shot.ready})")
        time.sleep(0.5)
    time.sleep(settle)  # the charts' transitions, the last image loads
    page.evaluate(DEEP_JS)
    clip = page.evaluate(shot.clip) or [0, 0, shot.width, shot.height]
    x, y, w, h = (max(0.0, float(v)) for v in clip)
    data = page("Page.captureScreenshot", format="png", captureBeyondViewport=False,
                clip={"x": x, "y": y, "width": w, "height": h, "scale": 1})["data"]
    return base64.b64decode(data)


def save_png(png: bytes, path: Path, max_bytes: int = MAX_PNG_BYTES) -> int:
    """Write the screenshot; over max_bytes, quantised to a palette (and shrunk while still over)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    while buf.tell() > max_bytes and image.width >= 600:
        buf = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buf, format="PNG", optimize=True)
        if buf.tell() > max_bytes:
            image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.Resampling.LANCZOS)
    path.write_bytes(buf.getvalue())
    return buf.tell()


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    logdir = run_dir / "tensorboard"
    if not logdir.is_dir():
        raise Failure(f"{logdir}: no such folder (RUN_DIR is a run folder: `vdvae train --run-dir` or "
                      "`vdvae demo --out OUT` -> OUT/run)")
    chromium = find_chromium(args.chromium)
    tensorboard = find_tensorboard()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"

    tb = browser = ws = None
    with tempfile.TemporaryDirectory(prefix="tb-shot-") as tmp:
        tmp = Path(tmp)
        log = tmp / "tensorboard.log"
        try:
            with open(log, "w") as log_file:
                # RUN_DIR/tensorboard, given relative to RUN_DIR's parent: the dashboards show the
                # log folder, and a screenshot should not carry this machine's paths
                tb = subprocess.Popen([tensorboard, "--logdir", f"{run_dir.name}/tensorboard", "--host", "127.0.0.1",
                                       "--port", str(port), "--reload_interval", "0"], cwd=run_dir.parent,
                                      stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            print(f"tensorboard on {base}, logdir {logdir}", flush=True)
            wait_for_tensorboard(base, tb, log, args.timeout)

            profile = tmp / "profile"
            profile.mkdir()
            with open(tmp / "chromium.log", "w") as log_file:
                browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                            f"--window-size={args.width},1000", "about:blank"],
                                           stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            cdp = f"http://127.0.0.1:{devtools_port(profile, browser, args.timeout)}"
            pages = [t for t in get_json(f"{cdp}/json/list") if t.get("type") == "page"]
            if not pages:
                raise Failure("chromium opened no page")
            ws = WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=args.timeout)
            page = DevTools(ws)
            page("Page.enable")
            page("Runtime.enable")
            for shot in shots(args.width, args.text):
                png = capture(page, base, shot, args.timeout, args.settle)
                size = save_png(png, out / shot.name)
                print(f"{out / shot.name}: {size // 1024} KB, {shot.what}", flush=True)
        finally:
            if ws is not None:
                ws.close()
            stop(browser)
            stop(tb)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Start TensorBoard on a run's logs (127.0.0.1 only), screenshot its scalars and images "
                    "dashboards (and the text one with --text) in headless Chromium, write the PNGs to --out, "
                    "stop TensorBoard. Needs Debian's chromium package (`apt-get install chromium`).",
        epilog="files: tensorboard.png (the scalars dashboard), tensorboard-images.png (the images "
               "dashboard: latents/usage heatmaps, reconstruction and sample grids), tensorboard-latents.png "
               "(the heatmaps close up, at 2x), tensorboard-text.png (with --text: the config). Each PNG is "
               "kept under 400 KB (quantised, or shrunk, if need be).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its tensorboard/ subfolder is read), "
                                                      "e.g. the demo's OUT/run")
    p.add_argument("--out", default="docs", help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="TensorBoard's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--width", type=int, default=1600, help="browser window width, CSS px (default: %(default)s)")
    p.add_argument("--text", action="store_true", help="also capture the text dashboard (the run's config)")
    p.add_argument("--chromium", help="the Chromium executable (default: chromium on PATH)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for TensorBoard, Chromium and each dashboard (default: %(default)s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds to wait after a dashboard has drawn, before its screenshot (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Failure as err:
        print(f"screenshot_tensorboard: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
