"""Open the built book in headless Chromium and check what a reader would see.

The book is built from a copy of the sources into a temporary folder (or, with
``EVIL_MOE_BOOK_HTML=<folder>``, an already built ``_build/html`` is checked,
e.g. the one ``make book`` produced). Each page is loaded from disk and must:

* show every image with a non-zero natural size (a broken path shows as 0x0);
* show no error text (a traceback, ``SomethingError``, a docutils system
  message, a MathJax error) and no glue placeholder or unresolved role;
* leave a full-page screenshot under ``<build>/screenshots/``.

Chromium and chromedriver come from Debian (``python -m evil_moe.testing_setup``
installs them; ``make test`` calls it). Set ``EVIL_MOE_SKIP_BROWSER=1`` to skip.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import nbformat
import pytest

from evil_moe import pipeline, testing_setup

pytestmark = pytest.mark.slow  # runs the pipeline (kernels, a book build)

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1")
"""Headless, and quiet on a closed network (no update, sync or QUIC probes)."""

WIDTH = 1280
MAX_HEIGHT = 12000

# (page, minimum number of images in the article); the results page joins this
# list once the lead adds it to the toc (see RESULTS_PAGE below).
PAGES = [
    ("index.html", 0),
    ("book/method/adapter.html", 1),
    ("book/method/grpo.html", 0),
    ("book/references.html", 0),
]
RESULTS_PAGE = "book/runs/results.html"
FIRST_PAGE = "book/runs/intro.html"
"""The built book's root when a preset's figures ran (pipeline.RUN_ROOT_PAGE)."""
APPENDIX = "book/runs/smoke"
"""The appendix the fixture's pipeline run adds (preset smoke, one arm and seed)."""

ERROR_TEXT = [
    (re.compile(r"Traceback \(most recent call last\)|\bTraceback\b"), "a traceback"),
    (re.compile(r"\b[A-Z][A-Za-z]*Error\b"), "an exception name"),
    (re.compile(r"System Message|Docutils System"), "a docutils system message"),
    (re.compile(r"\{glue[:}]|\bglue:|Glue reference"), "a glue placeholder"),
    (re.compile(r"\{(glue|cite|eq|doc|ref|numref|math)(:\w+)?\}`"), "an unresolved MyST role"),
    (re.compile(r"(^|\s):(width|name|alt|align|class|label|tags|figwidth):\s"),
     "a directive option leaked into the text"),
]
ERROR_SELECTORS = [
    (".system-message", "a docutils system message"),
    (".problematic", "an unresolved reference"),
    ("mjx-merror", "a MathJax error"),
    (".output.traceback, .output.error", "an error output cell"),
]

# Console messages that are not defects of the book: pydata-sphinx-theme
# complains that a file:// page has no stored light/dark preference.
KNOWN_CONSOLE_NOISE = (re.compile(r"Got invalid theme mode"),)

# Waits until MathJax (if the page loads it) has typeset, and every image has
# either loaded or failed. Lazy images are switched to eager loading first.
SETTLE_JS = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
imgs.forEach(i => { i.loading = 'eager'; });
const waits = imgs.map(i => i.complete ? Promise.resolve() :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); }));
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    waits.push(MathJax.startup.promise);
}
Promise.all(waits).then(() => done(true), () => done(false));
"""

IMAGES_JS = """
const article = document.querySelector('main article, article.bd-article, main') || document.body;
return Array.from(document.images).map(i => ({
    src: i.getAttribute('src'), complete: i.complete,
    w: i.naturalWidth, h: i.naturalHeight, in_article: article.contains(i)}));
"""


@pytest.fixture(scope="module")
def browser() -> testing_setup.Browser:
    if testing_setup.skip_requested():
        pytest.skip(f"{testing_setup.SKIP_ENV} is set")
    try:
        return testing_setup.ensure_browser(allow_install=False)
    except testing_setup.SetupError as e:
        pytest.fail(str(e))


PLOT_NOTEBOOK_CODE = (
    "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt\n"
    "fig, ax = plt.subplots(figsize=(4, 3))\nax.plot([0, 1, 2], [0, 1, 4])\n"
    "ax.set_title(f'{arm} seed {seed}')\nplt.show()")


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory) -> Path:
    """The book as the pipeline builds it: the prose pages plus an appendix made of
    two small executed notebooks (one draws a matplotlib figure). With
    ``EVIL_MOE_BOOK_HTML=<folder>`` an already built book is checked instead."""
    given = os.environ.get("EVIL_MOE_BOOK_HTML")
    if given:
        return Path(given)
    from test_pipeline import RUN_PARAMS, _notebook, copy_book, write_notebooks

    from evil_moe.config import load_preset

    tmp = tmp_path_factory.mktemp("book")
    nb_dir = write_notebooks(tmp / "notebooks")
    nbformat.write(_notebook("A figure", RUN_PARAMS, PLOT_NOTEBOOK_CODE),
                   str(nb_dir / "01_plot.ipynb"))
    root = copy_book(tmp / "root")
    cfg = load_preset("smoke", arms=["evil_moe"], seeds=[0])
    rc = pipeline.run(cfg, preset="smoke", runs_root=tmp / "runs", notebooks_dir=nb_dir,
                      per_run=["01_plot"], per_preset=["04_all"], book_root=root,
                      data_files=lambda c: [], log=lambda s: None)
    assert rc == 0, "the pipeline failed to build the book"
    return root / "_build" / "html"


@pytest.fixture(scope="module")
def driver(browser, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("chromium")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser.chromium
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp / 'profile'}")
    opts.add_argument(f"--window-size={WIDTH},1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager (which would go online) out of it.
    service = Service(executable_path=browser.chromedriver, log_output=str(tmp / "driver.log"))
    drv = webdriver.Chrome(service=service, options=opts)
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    yield drv
    drv.quit()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def check_page(driver, html_dir: Path, page: str, min_images: int = 0) -> tuple[list[str], Path]:
    """Load one page; return the problems found and the screenshot's path."""
    from selenium.webdriver.common.by import By

    path = html_dir / page
    assert path.exists(), f"{page} was not built"
    driver.set_window_size(WIDTH, 1000)
    driver.get(path.resolve().as_uri())
    settled = driver.execute_async_script(SETTLE_JS)
    problems = [] if settled else ["images or MathJax did not settle"]

    images = driver.execute_script(IMAGES_JS)
    for img in images:
        if not img["complete"] or img["w"] == 0 or img["h"] == 0:
            problems.append(f"image {img['src']} did not load "
                            f"(natural size {img['w']}x{img['h']})")
    n_article = sum(i["in_article"] for i in images)
    if n_article < min_images:
        problems.append(f"expected at least {min_images} image(s) in the article, "
                        f"found {n_article}")

    text = driver.find_element(By.TAG_NAME, "body").text  # rendered, visible text only
    for pattern, what in ERROR_TEXT:
        m = pattern.search(text)
        if m:
            around = text[max(0, m.start() - 60):m.end() + 60].replace("\n", " ")
            problems.append(f"{what} is shown: ...{around}...")
    for selector, what in ERROR_SELECTORS:
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]
        if found:
            problems.append(f"{what} is shown ({len(found)}x {selector}): "
                            f"{found[0].text[:120]!r}")
    for entry in driver.get_log("browser"):
        msg = entry["message"]
        if entry["level"] != "SEVERE" or any(p.search(msg) for p in KNOWN_CONSOLE_NOISE):
            continue
        if "mathjax" in msg.lower() and msg.startswith("http"):
            msg += (" -- the book loads MathJax from the network; install django-static-mathjax "
                    "so that book/_ext/evil_moe_book.py serves it from the book itself")
        problems.append(f"browser console: {msg[:400]}")

    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(WIDTH, min(max(int(height), 600), MAX_HEIGHT))
    shots = html_dir.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    shot = shots / (page.removesuffix(".html").replace("/", "__") + ".png")
    driver.save_screenshot(str(shot))
    return problems, shot


@pytest.mark.parametrize("page,min_images", PAGES, ids=[p for p, _ in PAGES])
def test_page_renders_cleanly(driver, html_dir, page, min_images):
    problems, shot = check_page(driver, html_dir, page, min_images)
    assert not problems, f"{page}:\n" + "\n".join(problems)
    w, h = png_size(shot)
    assert w >= WIDTH * 0.9 and h >= 600, f"screenshot {shot} is {w}x{h}"
    assert shot.stat().st_size > 20_000, f"screenshot {shot} looks blank"


def test_appendix_pages_render_with_figures_and_folded_parameters(driver, html_dir):
    from selenium.webdriver.common.by import By

    if not (html_dir / APPENDIX).exists():
        pytest.skip(f"no {APPENDIX} appendix in this build")
    problems, _ = check_page(driver, html_dir, f"{APPENDIX}/index.html")
    assert not problems, "\n".join(problems)
    assert "Runs of the smoke preset" in driver.find_element(By.CSS_SELECTOR, "article h1").text
    problems, _ = check_page(driver, html_dir, f"{APPENDIX}/04_all.html")
    assert not problems, "\n".join(problems)

    page = f"{APPENDIX}/evil_moe-s0/01_plot.html"
    problems, _ = check_page(driver, html_dir, page, min_images=1)
    assert not problems, f"{page}:\n" + "\n".join(problems)
    # the first code cell shows the parameters the run used; the smoke defaults are gone
    cell = driver.find_element(By.CSS_SELECTOR, ".cell.tag_injected-parameters .cell_input")
    assert cell.is_displayed(), "the run's parameters are not shown"
    assert 'arm = "evil_moe"' in cell.text and "Parameters of this run" in cell.text
    assert not driver.find_elements(By.CSS_SELECTOR, ".cell.tag_parameters")


@pytest.mark.slow
def test_results_page_of_the_smoke_pipeline(driver, smoke_pipeline):
    """The real pipeline's book: index and results pages load, every glued figure
    has a non-zero size, and no glue placeholder or error text shows."""
    root, _, rc = smoke_pipeline
    assert rc == 0, "the smoke pipeline failed"
    html = root / "_build" / "html"
    for page, min_images in (("index.html", 0), (FIRST_PAGE, 1), (RESULTS_PAGE, 4)):
        problems, _ = check_page(driver, html, page, min_images=min_images)
        assert not problems, f"{page}:\n" + "\n".join(problems)
    # the first page leads with the answer, glued from the runs, before the tour
    from selenium.webdriver.common.by import By
    driver.get((html / FIRST_PAGE).resolve().as_uri())
    text = driver.find_element(By.CSS_SELECTOR, "article").text
    assert "Removing the label-free router's hack expert" in text
    assert text.index("The answer, from the") < text.index("How the book is organised")


def test_results_page_of_a_given_book(driver, html_dir):
    """After `make book`: ``EVIL_MOE_BOOK_HTML=_build/html pytest tests/test_book_browser.py``
    checks that book's real results page too (the default fixture's book has none)."""
    if not (html_dir / RESULTS_PAGE).exists():
        pytest.skip("this build has no results page (set EVIL_MOE_BOOK_HTML to a built book)")
    problems, _ = check_page(driver, html_dir, RESULTS_PAGE, min_images=4)
    assert not problems, f"{RESULTS_PAGE}:\n" + "\n".join(problems)


def test_bibliography_and_equations_render(driver, html_dir):
    from selenium.webdriver.common.by import By

    check_page(driver, html_dir, "book/references.html")
    entries = driver.find_elements(By.CSS_SELECTOR, "div.citation, dl.citation > dt, .citation")
    assert len(entries) >= 10, f"only {len(entries)} bibliography entries rendered"
    check_page(driver, html_dir, "book/method/grpo.html")
    maths = driver.find_elements(By.CSS_SELECTOR, "mjx-container")
    assert len(maths) >= 5, f"MathJax typeset only {len(maths)} formulas"


def test_the_checks_catch_a_broken_page(driver, html_dir, tmp_path):
    """The checker itself must fail on a missing image and on error text."""
    bad = tmp_path / "html" / "bad.html"
    bad.parent.mkdir()
    bad.write_text("<html><body><main><article><p>Result: {glue:text}`hack_off`</p>"
                   "<img src='missing.png'><pre>Traceback (most recent call last):\n"
                   "ValueError: boom</pre></article></main></body></html>")
    problems, shot = check_page(driver, bad.parent, "bad.html", min_images=1)
    text = "\n".join(problems)
    assert "missing.png did not load" in text
    assert "a traceback is shown" in text and "an exception name is shown" in text
    assert "a glue placeholder is shown" in text
    assert shot.exists()
