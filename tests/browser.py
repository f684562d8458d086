"""Headless Debian `chromium` for the UI tests: the rendered DOM of a single-page app, plus a
screenshot saved as a test artifact (no Python browser driver needed).

`chromium --dump-dom` prints the DOM after the page's scripts ran for --virtual-time-budget ms of
virtual time, which is what an SPA (the Prefect and MLflow UIs) needs; `page` retries with a
larger budget until the caller's condition holds, then takes the screenshot of the same URL.
Screenshots and DOMs go to $MOONFORGE_TEST_ARTIFACTS or <tmp>/moonforge-test-artifacts/browser
(never into the checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def artifacts_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "moonforge-test-artifacts"
    d = Path(os.environ.get("MOONFORGE_TEST_ARTIFACTS") or default) / "browser"
    d.mkdir(parents=True, exist_ok=True)
    return d


def chromium_or_skip() -> str:
    for name in CANDIDATES:
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip(
        "no chromium binary on PATH (issue 4, browser test; skip expires 2026-12-31): "
        "install Debian's with `apt-get install -y chromium` (`make test` does this when "
        "it runs as root with apt)"
    )


def _chromium(exe: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mf-chromium-") as profile:
        return subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1440,900",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def page(
    exe: str,
    url: str,
    name: str,
    until: Callable[[str], bool],
    budgets: tuple[int, ...] = (8000, 20000, 45000),
) -> str:
    """The DOM of `url` once `until(dom)` holds (or the last try's DOM); saves <name>.html and
    <name>.png under artifacts_dir() and prints where they are."""
    out = artifacts_dir()
    dom = ""
    for budget in budgets:
        dom = _chromium(exe, f"--virtual-time-budget={budget}", "--dump-dom", url).stdout
        if until(dom):
            break
    (out / f"{name}.html").write_text(dom)
    shot = out / f"{name}.png"
    shot.unlink(missing_ok=True)
    res = _chromium(exe, f"--virtual-time-budget={budget}", f"--screenshot={shot}", url)
    assert shot.is_file() and shot.stat().st_size > 0, f"no screenshot of {url}: {res.stderr[-2000:]}"
    print(f"browser: {url} -> {shot}")
    return dom
