"""A real headless browser (Debian's chromium) opening a page: what rendered, and a screenshot."""
import json
import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (.ci/run installs Debian's chromium)"
    return path


def open_page(page: Path, screenshot: Path, width: int = 1200) -> tuple[list[dict], str]:
    """The page's own render check (#render-check: each plot's box and marks) and the browser's log;
    a full-page screenshot is written to `screenshot`."""
    # the same width both times: the plots' boxes are those of the screenshot's layout
    dom = subprocess.run([chromium(), *FLAGS, f"--window-size={width},800", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-3000:]
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom.stdout, re.S)
    plots = json.loads(found.group(1)) if found and found.group(1).strip() else []
    height = int(max((p["y"] + p["height"] for p in plots), default=800)) + 40
    shot = subprocess.run([chromium(), *FLAGS, f"--window-size={width},{height}", f"--screenshot={screenshot}",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-3000:]
    return plots, dom.stderr + shot.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
