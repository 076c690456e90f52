"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium, for the
tests that open the node's pages or a viewer in a real browser."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium import webdriver


@contextmanager
def chromium(window_size: str = "1400,1350") -> Iterator[webdriver.Chrome]:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromium-driver are needed: make install-dev installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={window_size}"):  # fmt: skip
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=driver)
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()
