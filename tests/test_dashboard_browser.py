"""The dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium, against `cadnode serve` with a film pushed by storescu.

The destination is a closed port and `dispatch.max_attempts` is 1, so the film's SR is made
and its delivery dead-lettered. The admin logs in, opens the study, presses Retry on the dead
letter, which goes back to pending and, now that a PACS (DCMTK's storescp) listens there,
is sent. The study's page is the README's screenshot (docs/dashboard.png), checked not blank.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.expected_conditions import (
    element_to_be_clickable,
    presence_of_element_located,
)
from selenium.webdriver.support.wait import WebDriverWait

from cadnode.admin.auth import hash_password
from cadnode.core import audit
from cadnode.core.db import Database
from cadnode.infer.phantoms.chest import write_chest_radiograph
from tests.browser import chromium
from tests.dicom_validation import require_tool
from tests.peers import REPO, Cadnode, free_port, port_open, run_cadnode, storescu, wait_for

PASSWORD = "browser test password"
# The README's picture: rewritten only when asked, so a test run leaves the checkout clean.
SCREENSHOT = REPO / "docs" / "dashboard.png"
UPDATE_SCREENSHOT = os.environ.get("CADNODE_UPDATE_SCREENSHOT") == "1"
PATIENT_NAME, PATIENT_ID = "Browsertest^Hildegard", "PID-BROWSER-4411"
# Every wait is on its condition (an element there, a row in a state); this only bounds it,
# generously, for a loaded machine.
PATIENCE_S = 120


# What chromedriver may answer about an element of a page it is leaving, in the moment
# between the old document and the new one, instead of "stale element".
LEAVING_THE_DOCUMENT = "does not belong to the document"


def gone(element: WebElement) -> Callable[[Any], bool]:
    """A wait's condition: `element`'s page has been replaced (selenium's `staleness_of`,
    which takes chromedriver's mid-navigation answer for a failure)."""

    def replaced(_: Any) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if LEAVING_THE_DOCUMENT in str(error):
                return True
            raise
        return False

    return replaced


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as chrome:
        yield chrome


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Cadnode, int]]:
    pacs_port = free_port()  # closed until the test starts a PACS there
    config = tmp_path / "cadnode.yaml"
    config.write_text(
        f"rules: {REPO / 'config' / 'rules.yaml'}\n"
        f"engines: {{dir: {REPO / 'engines'}}}\n"
        "storage: {min_free_mb: 1}\n"
        "dispatch: {max_attempts: 1, timeout_s: 5}\n"
        f"http: {{admin_password_hash: '{hash_password(PASSWORD)}'}}\n"
    )
    with run_cadnode(
        tmp_path / "node", f"PACS@127.0.0.1:{pacs_port}", CADNODE_CONFIG=str(config)
    ) as cadnode:
        wait_for(lambda: port_open(cadnode.http_port), 60, "the admin port")
        yield cadnode, pacs_port


def test_log_in_open_a_study_and_retry_its_dead_letter(
    node: tuple[Cadnode, int], browser: webdriver.Chrome, tmp_path: Path
) -> None:
    cadnode, pacs_port = node
    film = write_chest_radiograph(
        tmp_path / "chest.dcm", seed=211, pneumothorax=True, patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )
    assert storescu(cadnode.dicom_port, tmp_path / "chest.dcm").returncode == 0
    row = wait_for(
        lambda: next(
            (r for r in cadnode.studies()
             if r["study_uid"] == film.StudyInstanceUID and r["state"] == "failed"
             and len(r["deliveries"]) == 4
             and all(d["state"] == "failed" for d in r["deliveries"])),
            None,
        ),
        PATIENCE_S, "the results made and their deliveries dead-lettered", interval_s=0.3,
    )
    dead = row["deliveries"]  # the rule-out SR, the segmenter's SEG and SR, the findings SR
    assert len(dead) == 4
    assert all(d["state"] == "failed" and d["attempts"] == 1 for d in dead)
    base = f"http://127.0.0.1:{cadnode.http_port}"

    browser.get(f"{base}/studies")
    assert "/login" in browser.current_url  # no page without the login
    present(browser, "#password").send_keys(PASSWORD)
    clickable(browser, "#login").click()

    # The studies page, once it has loaded its link to the study.
    clickable(browser, f'a.job-link[href="/jobs/{row["job"]}"]').click()
    wait_for(lambda: "/jobs/" in browser.current_url, PATIENCE_S, "the study's page")
    loaded(browser)
    page = present(browser, "main").text
    assert "cxr-ruleout" in page and "cxr-segmenter" in page and "encoded" in page
    assert "association not established" in page
    thumbnail = present(browser, "img.thumbnail")
    assert browser.execute_script("return arguments[0].naturalWidth", thumbnail) > 100

    storescp = _start_pacs(pacs_port, tmp_path / "pacs")
    try:
        for _ in dead:  # each press answers on the queues page, which lists those left
            retry = clickable(browser, "button.retry")
            action = retry.find_element(By.XPATH, "..").get_attribute("action") or ""
            delivery = action.split("/")[-2]
            retry.click()
            # The press answers with a new page: wait until the one pressed on is gone.
            WebDriverWait(browser, PATIENCE_S).until(gone(retry))
            wait_for(lambda: "/queues" in browser.current_url, PATIENCE_S, "the queues page")
            note = present(browser, "#note").text
            assert note == f"delivery {delivery}: pending again, due now"
        wait_for(
            lambda: _state_of(cadnode, film.StudyInstanceUID) == "delivered", PATIENCE_S,
            "the retried delivery to be sent", interval_s=0.3,
        )
    finally:
        storescp.terminate()
        storescp.wait(10)

    browser.get(f"{base}/jobs/{row['job']}")
    loaded(browser)  # its thumbnails drawn, for the screenshot
    assert "sent" in present(browser, ".delivery-state").text
    screenshot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "dashboard.png"
    browser.save_screenshot(str(screenshot))
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] >= 1000 and pixels.std() > 20  # a page, not a blank

    trail = list(audit.events(Database(cadnode.data_dir / "cadnode.db")))
    kinds = {event.kind for event in trail}
    assert {"association", "study.received", "admin.login", "admin.delivery.retry"} <= kinds
    assert "result.delivered" in kinds and "engine" in kinds and "rules" in kinds
    [received] = [e for e in trail if e.kind == "study.received"]
    assert received.details["PatientID"] == PATIENT_ID  # the trail names whose study it was
    log = cadnode.log_text()
    assert '"event": "admin.listening"' in log
    for identifier in (PATIENT_NAME, PATIENT_ID, "Browsertest", "Hildegard"):
        assert identifier not in log  # ... the logs never do


def loaded(browser: webdriver.Chrome) -> None:
    """The current page parsed and its images loaded (the document's load event)."""
    wait_for(
        lambda: browser.execute_script("return document.readyState") == "complete",
        PATIENCE_S, f"{browser.current_url} to load",
    )


def present(browser: webdriver.Chrome, css: str) -> WebElement:
    """The element, once the page has it (pages load after a click returns)."""
    wait = WebDriverWait(browser, PATIENCE_S)
    element: WebElement = wait.until(presence_of_element_located((By.CSS_SELECTOR, css)))
    return element


def clickable(browser: webdriver.Chrome, css: str) -> WebElement:
    """The element, once it is there, shown and enabled."""
    wait = WebDriverWait(browser, PATIENCE_S)
    element: WebElement = wait.until(element_to_be_clickable((By.CSS_SELECTOR, css)))
    return element


def _start_pacs(port: int, folder: Path) -> subprocess.Popen[bytes]:
    folder.mkdir()
    process = subprocess.Popen(
        [require_tool("storescp"), "-aet", "PACS", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(port), 30, "storescp to listen")
    return process


def _state_of(cadnode: Cadnode, study_uid: str) -> str:
    rows = [r for r in cadnode.studies() if r["study_uid"] == study_uid]
    return str(rows[-1]["state"]) if rows else ""
