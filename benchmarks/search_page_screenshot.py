"""Screenshot of the search page: serve an index on loopback, search in headless Chromium, save a PNG.

    python benchmarks/search_page_screenshot.py INDEX "query" docs/images/search_page.png [--k 8] [--depth 20]

Needs the ``browser`` extra (playwright) and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index")
    parser.add_argument("query")
    parser.add_argument("out")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        print("no chromium found (apt install chromium)", file=sys.stderr)
        return 1
    import uvicorn
    from playwright.sync_api import sync_playwright

    from stagewise.serving.service import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(args.index), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('about').textContent.includes('documents')")
            page.fill("#query", args.query)
            page.fill("#k", str(args.k))
            if args.depth:
                page.fill("#depth", str(args.depth))
            page.press("#query", "Enter")
            page.wait_for_selector("li.hit")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
