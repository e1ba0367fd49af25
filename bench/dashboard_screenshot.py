"""A screenshot of a run's TensorBoard dashboards (the custom-scalars tab), for the README.

Serves the run with `parcae tb` on a free loopback port and renders the page with headless chromium
(Debian's, through playwright), as tests/pipeline/jobs/test_eval_run.py does.

    python bench/dashboard_screenshot.py runs/demo/run docs/dashboard.png [--tab custom_scalars]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--tab", default="custom_scalars")
    parser.add_argument("--size", default="1400x1500", help="viewport WIDTHxHEIGHT")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "tb", args.run, "--port", str(port)], cwd=REPO, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("TensorBoard did not answer within 60 s")
                time.sleep(0.5)
        width, height = (int(x) for x in args.size.split("x"))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(f"http://127.0.0.1:{port}/#{args.tab}")
            page.wait_for_timeout(8_000)  # the dashboard loads its data and draws
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
