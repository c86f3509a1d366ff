"""report.html in a real browser: headless Chromium (Debian's ``chromium``; .ci/run installs it) renders
the trial table and every plot, and the page fetches nothing from the network."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_llama.report_html import caption
from tune_llama.report import trial_rows, write_report
from tune_llama.results import load_search


WINDOW = (1200, 6000)  # tall enough for the whole report of a small search in one screenshot
BORDER = (204, 204, 204)  # report.html's table border colour, #ccc


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:  # not a skip: CI installs it, and without it this check would silently not run
        pytest.fail("chromium not found on PATH: run tests/integration/system_packages.sh (make test does)")
    return path


def headless(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium with a fresh profile, in sRGB at scale 1 (so that a PNG on the
    page is drawn with its own pixels), without the browser's own background traffic."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               "--force-color-profile=srgb", "--force-device-scale-factor=1", "--hide-scrollbars",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=10000", *args, page.as_uri()]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.fail(f"chromium could not run: {err}")
    if proc.returncode != 0:
        pytest.fail(f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked the network stack for (Chromium's net log; the browser's own
    requests, e.g. its updater's, belong to other sites than the file:// page)."""
    log = json.loads(net_log.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    return [event["params"]["url"] for event in log["events"]
            if names.get(event["type"]) == "URL_REQUEST_START_JOB" and "url" in event.get("params", {})
            and str(event["params"].get("network_isolation_key", "")).startswith("file://")]


class Dom(HTMLParser):
    """The rendered DOM's tables (rows of cell texts), <img> elements and every URL-valued attribute."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [value for key, value in attrs.items() if key in ("src", "href", "srcset", "poster", "data")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def find_image(shot: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Where ``image`` appears pixel for pixel in ``shot`` (top-left x, y), or None."""
    height, width, _ = image.shape
    packed = colours_of(image)
    key_row = max(range(height), key=lambda y: len(np.unique(packed[y])))  # the most distinctive row
    needle = image[key_row].tobytes()
    for y in range(key_row, shot.shape[0] - (height - key_row) + 1):
        haystack = shot[y].tobytes()
        at = haystack.find(needle)
        while at >= 0:
            x, top = at // 3, y - key_row
            if at % 3 == 0 and np.array_equal(shot[top:top + height, x:x + width], image):
                return x, top
            at = haystack.find(needle, at + 1)
    return None


def colours_of(pixels: np.ndarray) -> np.ndarray:
    """Each RGB pixel as one integer (np.unique on rows of three is slow)."""
    pixels = pixels.astype(np.uint32)
    return pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def rendered(tiny_search, tmp_path_factory):
    """report.html of the tiny search, its screenshot, its DOM after rendering, and the page's requests."""
    written = write_report(tiny_search)
    page = tiny_search / "report" / "report.html"
    work = tmp_path_factory.mktemp("chromium")
    shot_file, net_log = work / "report.png", work / "net.json"
    headless(page, work / "profile-shot", f"--screenshot={shot_file}", f"--log-net-log={net_log}")
    if not shot_file.is_file():
        pytest.fail(f"chromium wrote no screenshot at {shot_file}")
    dom = Dom(headless(page, work / "profile-dom", "--dump-dom").stdout)
    pngs = [p for p in written if p.suffix == ".png"]
    shot = rgb(shot_file)
    return {"search": load_search(tiny_search), "pngs": pngs, "shot": shot, "dom": dom,
            "places": {p.stem: find_image(shot, rgb(p)) for p in pngs}, "requests": page_requests(net_log)}


def test_the_rendered_page_has_a_row_per_trial_and_every_plot_as_an_image(rendered):
    dom, search = rendered["dom"], rendered["search"]
    rows = trial_rows(search)
    trials = dom.tables[0]
    assert trials[0][:2] == ["trial", "training.lr"]
    assert [row[0].split(" (")[0] for row in trials[1:]] == [r["trial"] for r in rows]
    assert trials[1][0] == f"{rows[0]['trial']} (best)"  # the best trial: first, named and highlighted
    assert len(rows) == search.spec.search.num_samples
    # Each plot once, named in words (its caption), not by its file name.
    assert sorted(image["alt"] for image in dom.images) == sorted(caption(p, search.metric) for p in rendered["pngs"])
    assert all(image["src"].startswith("data:image/png;base64,") for image in dom.images)


def test_every_plot_is_drawn_on_the_screenshot_at_its_own_size(rendered):
    assert rendered["shot"].shape[:2] == (WINDOW[1], WINDOW[0])
    places = rendered["places"]
    missing = [name for name, place in places.items() if place is None]
    assert not missing, f"not drawn (a broken or missing image): {missing}"
    assert set(places) == {"eval_loss", "eval_perplexity", "best_so_far", "eval_loss_vs_lr", "parallel_coordinates",
                           "param_importance"}
    tops = sorted(top for _, top in places.values())
    assert len(set(tops)) == len(tops), "each plot in its own place"


def test_the_screenshot_shows_the_trial_table_above_the_plots(rendered):
    shot = rendered["shot"]
    first_plot = min(top for _, top in rendered["places"].values())
    above = shot[:first_plot]
    border_lines = int(((above == BORDER).all(axis=2).sum(axis=1) > 300).sum())  # table rules, 1 px each
    assert border_lines >= len(rendered["dom"].tables[0]) + 1, border_lines  # one above each row, one below
    text = (above.max(axis=2) < 100).sum()  # dark pixels: the headings and cell text
    assert text > 5_000, text
    colours = len(np.unique(colours_of(shot)))
    assert colours > 500, f"a nearly blank page: {colours} distinct colours"


def test_the_page_loads_nothing_from_the_network(rendered):
    assert rendered["requests"] == []
    external = [url for url in rendered["dom"].urls if not url.startswith(("data:", "#"))]
    assert external == []


def test_the_network_check_sees_a_page_that_fetches_something(tmp_path):
    # The check above passes on an empty list; here it must find the one remote image of a page.
    page = tmp_path / "remote.html"
    page.write_text("<!doctype html><html><body><img src='http://report.invalid/plot.png'></body></html>")
    headless(page, tmp_path / "profile", f"--log-net-log={tmp_path / 'net.json'}", "--dump-dom")
    assert page_requests(tmp_path / "net.json") == ["http://report.invalid/plot.png"]
