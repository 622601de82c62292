"""The web page end to end, in real headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``make setup`` installs it with apt; Playwright's own
browser download cannot run here), or the executable named by ``MMRET_CHROMIUM``. Without one
the test is skipped. Screenshots are kept in ``test-artifacts/`` (or ``MMRET_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import mmret
from mmret.server import ServerConfig, create_app

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("MMRET_CHROMIUM") or shutil.which("chromium")
ARTIFACTS = Path(
    os.environ.get("MMRET_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium: `make setup` installs Debian's (apt-get install chromium)",
)


@pytest.fixture
def server(tmp_path: Path, photo_folder: Path) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, over the captioned photo folder."""
    folder = tmp_path / "index.mmret"
    with mmret.Retriever.create(folder, model="hash:32") as retriever:
        retriever.add(mmret.read_items(photo_folder))
    yield from _serve(folder)


def _serve(folder: Path) -> Iterator[str]:
    """Serve the index ``folder`` with uvicorn on a free loopback port; yield its URL."""
    app = create_app(ServerConfig(index=str(folder), token="browser-test-token"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(runner.serve(sockets=[sock])))
    thread.start()
    try:
        for _ in range(200):
            if runner.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert runner.started, "the server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_search_page_by_text_image_and_more_like_this(server: str, photo_folder: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.route(  # the page must work offline: any request elsewhere fails the test
            lambda url: not url.startswith(server),
            lambda route: (problems.append(f"left the server: {route.request.url}"), route.abort()),
        )
        page.goto(server)
        expect = sync_api.expect
        expect(page.locator("#index-info")).to_contain_text("5 items")

        # by text, typed and sent with Enter
        page.locator("h1").click()  # focus off the search box: "/" brings it back
        page.keyboard.press("/")
        page.keyboard.type("a yellow square")
        expect(page.locator("#query-text")).to_have_value("a yellow square")
        page.keyboard.press("Enter")
        cards = page.locator("#results .card")
        expect(cards).to_have_count(5)
        expect(cards.first.locator(".item-id")).to_have_text("yellow")
        expect(cards.first.locator(".caption")).to_have_text("a yellow square")
        expect(page.locator("#status")).to_contain_text("5 results")
        first_thumb = cards.first.locator(".thumb img")
        expect(first_thumb).to_be_visible()
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results .thumb img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        score = float(cards.first.locator(".score").inner_text())
        assert 0 < score <= 1
        page.screenshot(path=str(ARTIFACTS / "search-text.png"), full_page=True)

        # metadata of a result in a sub-folder
        grey = page.locator("#results .card[data-id='more/grey']")
        expect(grey.locator(".metadata")).to_contain_text("folder")
        expect(grey.locator(".metadata")).to_contain_text("more")

        # by an uploaded image (the file picker)
        page.locator("#query-text").fill("")
        page.set_input_files("#image-input", str(photo_folder / "blue.jpg"))
        expect(page.locator("#image-chip")).to_be_visible()
        expect(cards.first.locator(".item-id")).to_have_text("blue")
        page.screenshot(path=str(ARTIFACTS / "search-image.png"), full_page=True)

        # by an image dropped on the search box, then by one pasted
        for event, colour in (("drop", "red"), ("paste", "green")):
            page.evaluate(
                """async ([event, url]) => {
                    const blob = await (await fetch(url)).blob();
                    const data = new DataTransfer();
                    data.items.add(new File([blob], "query.jpg", {type: "image/jpeg"}));
                    const target = document.getElementById("drop-zone");
                    const options = {bubbles: true, cancelable: true};
                    target.dispatchEvent(event === "drop"
                        ? new DragEvent("drop", {...options, dataTransfer: data})
                        : new ClipboardEvent("paste", {...options, clipboardData: data}));
                }""",
                [event, f"/thumbnails/{colour}"],
            )
            expect(cards.first.locator(".item-id")).to_have_text(colour)

        # more like this, from the keyboard: arrow to a result, then m
        page.keyboard.press("Escape")  # drops the image and focuses the search box
        expect(page.locator("#image-chip")).to_be_hidden()
        page.locator("#results .card").first.locator(".more-like").focus()
        page.keyboard.press("m")
        expect(page.locator("#like-banner")).to_be_visible()
        expect(page.locator("#like-id")).to_have_text("green")
        expect(cards).to_have_count(4)
        assert "green" not in page.locator("#results .item-id").all_inner_texts()

        # a filter that matches nothing: a readable empty state
        page.locator("#clear-like").click()
        page.locator("#query-text").fill("square")
        page.locator("#filter").fill("folder=nowhere")
        page.keyboard.press("Enter")
        expect(page.locator("#results .empty")).to_contain_text("Nothing matches this filter")

        # a malformed filter: the server's message, shown as an alert
        page.locator("#filter").fill("year>>3")
        page.locator("#search-button").click()
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("year")
        page.screenshot(path=str(ARTIFACTS / "search-error.png"), full_page=True)
        browser.close()
    # the one console error: the browser's note of the 400 the malformed filter got
    assert problems == [
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    ]


@pytest.fixture
def year_server(tmp_path: Path) -> Iterator[str]:
    """20 photos in year folders, portrait, landscape and square alike, with captions of one
    to many lines, served as :func:`server` serves its folder."""
    from tests.conftest import solid

    shapes = [(300, 900), (900, 500), (600, 600), (240, 960), (1000, 300)]
    for n in range(20):
        year = "2017" if n % 2 else "2018"
        folder = tmp_path / "photos" / year
        folder.mkdir(parents=True, exist_ok=True)
        solid((12 * n, 255 - 12 * n, 90), shapes[n % len(shapes)]).save(folder / f"p{n:02}.jpg")
        caption = "a plate of food on a table" + " with many things on it" * (n % 4)
        (folder / f"p{n:02}.txt").write_text(caption)
    index = tmp_path / "years.mmret"
    with mmret.Retriever.create(index, model="hash:32") as retriever:
        retriever.add(mmret.read_items(tmp_path / "photos"))
    yield from _serve(index)


def test_result_grid_rows_line_up_and_year_folders_filter(year_server: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(year_server)
        page.locator("#query-text").fill("a plate of food on a table")
        page.keyboard.press("Enter")
        cards = page.locator("#results .card")
        sync_api.expect(cards).to_have_count(20)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results .thumb img')]"
            ".every(img => img.complete && img.naturalWidth > 0)"
        )
        page.screenshot(path=str(ARTIFACTS / "grid-20.png"), full_page=True)
        boxes = page.evaluate(
            """() => [...document.querySelectorAll('#results .card')].map(card => {
                const box = card.getBoundingClientRect();
                const thumb = card.querySelector('.thumb').getBoundingClientRect();
                return {top: box.top, height: box.height, thumb: thumb.height,
                        width: thumb.width};
            })"""
        )
        rows: dict[float, list[float]] = {}
        for box in boxes:
            rows.setdefault(round(box["top"]), []).append(box["height"])
        assert len(rows) > 1
        for heights in rows.values():
            assert max(heights) - min(heights) < 1, rows
        # every thumbnail has one shape (4:3), whatever its photo's
        assert {round(box["thumb"]) for box in boxes} == {round(boxes[0]["width"] * 3 / 4)}
        # the whole photo is a click away
        link = cards.first.locator(".thumb a")
        assert "size=" in (link.get_attribute("href") or "")

        # a folder named by year, in the filter box
        page.locator("#filter").fill("folder=2017")
        page.keyboard.press("Enter")
        sync_api.expect(cards).to_have_count(10)
        ids = page.locator("#results .item-id").all_inner_texts()
        assert all(id_.startswith("2017/") for id_ in ids), ids
        page.locator("#filter").fill('folder="2018" year>=0')
        page.keyboard.press("Enter")
        sync_api.expect(page.locator("#results .empty")).to_be_visible()  # no item has a year
        browser.close()
