"""Drives pool-managerd's status page in headless Chromium (Debian's, through Playwright's driver;
no browser is downloaded) for tests/tests/operator_view.rs, and prints what it saw as JSON.

    python status_page_check.py SHIM_URL ORCHESTRATOR_URL MODEL POOL [POOL ...]

It opens SHIM_URL/status, waits for every POOL's row, reads each row's state and slots, waits for
orchestratord's live figures to arrive, then sends one chat request to ORCHESTRATOR_URL for
MODEL and waits, without reloading the page, for the "requests answered" figure to grow.
Exit status 0 with the JSON on stdout; a timeout or a missing element is an exception (status 1).
"""

import json
import sys
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 20_000


def chat(orchestrator: str, model: str) -> int:
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
    }).encode()
    request = urllib.request.Request(
        f"{orchestrator}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
        return answer.status


def main() -> None:
    shim, orchestrator, model, *pools = sys.argv[1:]
    seen = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
        page = browser.new_page()
        page.on("console", lambda message: print(f"console: {message.text}", file=sys.stderr))
        response = page.goto(f"{shim}/status")
        seen["status"] = response.status if response else None
        # The first paint is the server's: rows are there before any script ran.
        seen["first_paint_rows"] = page.locator("#pools tbody tr").count()
        for pool in pools:
            row = page.wait_for_selector(f'#pools tbody tr[data-id="{pool}"]', timeout=WAIT_MS)
            cells = [cell.inner_text() for cell in row.query_selector_all("td")]
            seen[pool] = {"state": cells[2], "slots": cells[4]}
        try:
            page.wait_for_function(
                "() => /^\\d+$/.test(document.querySelector('#requests b')?.textContent ?? '')",
                timeout=WAIT_MS,
            )
        except Exception:
            print(f"live figures: {page.inner_html('#live')}", file=sys.stderr)
            raise
        before = int(page.inner_text("#requests b"))
        page.evaluate("() => { window.notReloaded = true; }")
        seen["chat_status"] = chat(orchestrator, model)
        page.wait_for_function(
            f"() => Number(document.querySelector('#requests b').textContent) > {before}",
            timeout=WAIT_MS,
        )
        seen["requests_before"] = before
        seen["requests_after"] = int(page.inner_text("#requests b"))
        seen["reloaded"] = page.evaluate("() => window.notReloaded !== true")
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
