"""The web page driven in headless Chromium (Debian's chromium and chromium-driver, no download): a run
of the default question, then a screenshot.

    python benchmarks/page_screenshot.py --model qwen2.5-coder-0.5b --out docs/page.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def chromium(width: int = 1280, height: int = 1000) -> webdriver.Chrome:
    """Headless Chromium through the system's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def run_page(driver: webdriver.Chrome, url: str, fields: dict[str, str], timeout_s: float = 300.0) -> None:
    """Open the page, set `fields` (element id -> value; "" clears), press Run, wait for the end."""
    driver.get(url)
    for field, value in fields.items():
        box = driver.find_element(By.ID, field)
        box.clear()
        if value:
            box.send_keys(value)
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, timeout_s).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done")
        or d.find_element(By.ID, "status").text)


def main() -> None:
    from parsyn import load
    from parsyn.adapter import resolve
    from parsyn.serve.api import create_app
    from parsyn.serve.local import LocalServer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model name or path (default: the default model)")
    parser.add_argument("--out", type=Path, default=Path("docs/page.png"))
    args = parser.parse_args()
    lm = load(args.model)
    app = create_app(lm, model_name=lm.name, synthesizer=resolve(lm, "auto"))
    with LocalServer(app) as url:
        driver = chromium()
        try:
            run_page(driver, url + "/", {})
            status = driver.find_element(By.ID, "status").text
            if status:
                sys.exit(f"page_screenshot: the page says: {status}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    app.state.engine.stop()
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
