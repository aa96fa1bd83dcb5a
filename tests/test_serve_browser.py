"""The web chat at `/` in a real headless Chromium: a streamed reply appears, and Stop ends a long one.

Needs Debian's `chromium` and `chromium-driver` packages (skipped cleanly without them). Screenshots go to the
folder named by $MINIGPT_ARTIFACTS (CI keeps it), else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from minigpt.model.gpt import GPT, ModelConfig  # noqa: E402
from minigpt.runs.loading import load_run  # noqa: E402
from minigpt.serve.serve import BackgroundServer, ServeConfig, create_app  # noqa: E402
from minigpt.text.chat_format import CHAT_DECODING  # noqa: E402
from minigpt.text.tokenizer import Tokenizer  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(DRIVER)),
                                reason="needs chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,720", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("MINIGPT_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, url: str, temperature: float) -> None:
    browser.get(url)
    WebDriverWait(browser, 10).until(lambda b: "window" in b.find_element(By.ID, "model").text)
    # a range input cannot be typed into: set it as a user's drag would, with an input event
    browser.execute_script("const t = document.getElementById('temperature'); t.value = arguments[0];"
                           "t.dispatchEvent(new Event('input'));", str(temperature))


def send(browser, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def replies(browser) -> list[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant .text")]


def test_a_typed_message_gets_a_streamed_reply(browser, chat_run, artifacts):
    model, tokenizer, _ = load_run(chat_run)
    app = create_app(model, tokenizer, ServeConfig(model=str(chat_run)), "chat")
    with BackgroundServer(app) as server:
        open_page(browser, server.url, 0)
        # record every text the reply shows, to see it arrive in pieces: each update replaces the reply's text
        # node, and the mutation records keep the replaced and the new node even when several updates land
        # between two callbacks
        browser.execute_script(
            "window.seen = []; new MutationObserver((records) => { for (const r of records) {"
            " if (!r.target.closest || !r.target.closest('.msg.assistant .text')) continue;"
            " for (const n of [...r.removedNodes, ...r.addedNodes]) if (n.textContent) window.seen.push(n.textContent);"
            " } }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});")
        send(browser, "Hello")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy")
                                         == "false" and replies(b))
        assert replies(browser) == ["Hi there!"]
        seen = list(dict.fromkeys(browser.execute_script("return window.seen")))
        assert len(seen) >= 3 and all("Hi there!".startswith(t) for t in seen)  # growing prefixes, then the whole
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.user .text")] == ["Hello"]
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        assert "generated" in browser.find_element(By.ID, "status").text  # the usage chunk was read
        browser.save_screenshot(str(artifacts / "serving-chat.png"))
        # keep talking past the 64-token window: the page leaves out the oldest turns and says so
        notes = lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, "#log .msg.assistant .note")]  # noqa: E731
        for turn in range(2, 12):
            send(browser, "Hello")
            WebDriverWait(browser, 20).until(lambda b, n=turn: len(replies(b)) == n and b.find_element(
                By.TAG_NAME, "body").get_attribute("data-busy") == "false")
            if any("left out" in note for note in notes(browser)):
                break
        assert any("left out" in note for note in notes(browser))
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
        browser.find_element(By.ID, "new-chat").click()
        assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []


def test_stop_ends_a_long_reply_and_frees_the_server(browser, artifacts):
    # A random model over GPT-2's 50k vocabulary almost never says <|end|>: its reply runs to the 1024-token window
    tokenizer = Tokenizer.gpt2().with_chat_tokens()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=1024, vocab_size=tokenizer.n_vocab)).eval()
    app = create_app(model, tokenizer, ServeConfig(model="random"), "random")
    with BackgroundServer(app) as server:
        open_page(browser, server.url, 1.0)
        send(browser, "Tell me a long story.")
        WebDriverWait(browser, 20).until(lambda b: replies(b) and len(replies(b)[0]) > 20)
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "true"
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy")
                                         == "false")
        note = browser.find_element(By.CSS_SELECTOR, "#log .msg.assistant .note").text
        assert note == "(stopped)"
        deadline = time.monotonic() + 3
        while httpx.get(server.url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").json()["running"] == 0  # the aborted fetch freed the row
        text = replies(browser)[0]
        time.sleep(0.3)
        assert replies(browser)[0] == text  # nothing arrives after Stop
        browser.save_screenshot(str(artifacts / "serving-chat-stopped.png"))


def test_the_page_starts_from_the_chat_decoding_defaults_and_sends_them(browser, chat_run):
    model, tokenizer, _ = load_run(chat_run)
    app = create_app(model, tokenizer, ServeConfig(model=str(chat_run)), "chat")
    with BackgroundServer(app) as server:
        browser.get(server.url)
        WebDriverWait(browser, 10).until(lambda b: "window" in b.find_element(By.ID, "model").text)
        shown = {key: float(browser.find_element(By.ID, element).get_attribute("value"))
                 for key, element in (("temperature", "temperature"), ("top_p", "top-p"),
                                      ("frequency_penalty", "repetition"))}
        assert shown == {key: CHAT_DECODING[key] for key in shown}  # `minigpt chat`'s defaults, not loops
        browser.execute_script("window.sent = []; const real = window.fetch; window.fetch = (url, options) => {"
                               " if (options && options.body) window.sent.push(JSON.parse(options.body));"
                               " return real(url, options); };")
        send(browser, "Hello")
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-busy")
                                         == "false" and replies(b))
        (request,) = browser.execute_script("return window.sent")
        assert {key: request[key] for key in shown} == shown
