"""The report's index.html: every table and figure file the report wrote is on the page, text is escaped, nothing
is fetched from a network; in headless Chromium every picture loads and every table has rows.

The report is made from a small generated store (et + vit × steps {1, 2} × 2 seeds, schema-faithful runs with
energy traces and images; ``etbench.testing.report_store``). Only the browser test is skipped, with the reason, where
Chromium, its driver or selenium is missing.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from etbench.analysis import html_report, tuning_report
from etbench.analysis import report as report_mod
from etbench.analysis.html_report import INDEX_HTML, write_html_report
from etbench.analysis.report import ReportResult, make_report
from etbench.testing.report_store import StoreShape, generate_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # a URL with a scheme (http:, https:, file:, //… has none)


class _Page(HTMLParser):
    """The tags, image sources, link targets and tables of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tables = 0
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.srcs.append(values.get("src") or "")
        if values.get("href") is not None:
            self.hrefs.append(str(values["href"]))
        self.tables += tag == "table"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    dest = tmp_path_factory.mktemp("html_report") / "store"
    return generate_store(dest, StoreShape((1, 2), (16,), (1e-3,), (0, 1), epochs=2, trace_samples=2),
                          name="html-report", progress=lambda s: None)


@pytest.fixture(scope="module")
def report(store: dict, tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    out = tmp_path_factory.mktemp("html_report_out") / "report"
    return make_report(store["experiment"], store["tracking_uri"], out, progress=lambda s: None)


def _files(out: Path) -> list[str]:
    """Every file the report wrote, relative to its folder (hidden cache and manifest, and the page, left out)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != INDEX_HTML
                  and not any(part.startswith(".") for part in p.relative_to(out).parts))


def _pictures(out: Path) -> list[bytes]:
    """The bytes of every PNG under figures/ and images/ (two runs' images may be equal)."""
    return [p.read_bytes() for sub in ("figures", "images") for p in (out / sub).glob("*.png")]


def _embedded(page: _Page) -> list[bytes]:
    """The decoded bytes of the page's pictures; each must be a PNG data URI."""
    assert all(s.startswith("data:image/png;base64,") for s in page.srcs), page.srcs
    return [base64.b64decode(s.split(",", 1)[1]) for s in page.srcs]


def test_index_lists_every_table_and_figure_file_and_fetches_nothing(report: ReportResult) -> None:
    out = report.out
    assert report.html == out / INDEX_HTML and html_report.MANIFEST == report_mod.MANIFEST
    text = report.html.read_text(encoding="utf-8")
    page = _Page(text)
    written = [str(p.relative_to(out)) for p in report.tables + report.figures + report.images]
    assert any(p.startswith("tables/") and p.endswith(".tex") for p in written) and report.images  # a real report
    linked = {unquote(h) for h in page.hrefs if not h.startswith("#")}
    assert set(written) | {"runs.csv", "excluded_runs.csv", "README.md"} <= linked
    assert linked == set(_files(out))  # and nothing else: every link points at a file of the report
    # every PNG under figures/ and images/ is on the page, embedded: its bytes, exactly once
    assert sorted(_embedded(page)) == sorted(_pictures(out))
    # every table file's stem is rendered as one HTML table (the README's inline ones and the CSV-only data)
    stems = {p.rsplit(".", 1)[0] for p in _files(out) if p.startswith("tables/")}
    assert page.tables == len(stems) > 2
    for stem in stems:
        assert f'id="table-{stem.replace("/", "-")}"' in text
    # captions and the README's reading notes
    shown = html.unescape(text)
    assert report.titles and all(title in shown for title in report.titles.values())
    assert tuning_report.UNTUNED_NOTE.strip() in shown and report.skipped
    assert all(note in shown for note in report.skipped)
    # offline: no scripts, no stylesheets or frames to load, no URL with a scheme other than data:
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert not [u for u in page.srcs + page.hrefs if SCHEME.match(u) and not u.startswith("data:image/")]
    assert "url(" not in text and "@import" not in text


def test_unchanged_report_keeps_its_page_and_restores_a_deleted_one(store: dict, report: ReportResult) -> None:
    out, experiment, uri = report.out, store["experiment"], store["tracking_uri"]
    before = report.html.stat().st_mtime_ns
    kept = make_report(experiment, uri, out, progress=lambda s: None)
    assert kept.html == report.html and report.html.stat().st_mtime_ns == before
    report.html.unlink()
    again = make_report(experiment, uri, out, progress=lambda s: None)
    assert again.html == report.html and report.html.exists()


def test_page_escapes_text_and_shows_files_the_readme_does_not_name(report: ReportResult, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(report.out, out)
    readme = out / "README.md"
    lines = readme.read_text().splitlines()
    readme.write_text("\n".join([lines[0] + ' <script>alert("x")</script> & co', *lines[1:],
                                 "", "see [a link](https://example.org) and ![pic](https://example.org/a.png)"]))
    png = next((out / "figures").glob("*.png"))
    shutil.copyfile(png, out / "figures" / "extra <b>&.png")
    (out / "tables" / "odd&name.csv").write_text("cell,value\n<i>x</i>,1.5\n")
    (out / "tables" / "empty.csv").write_text("")
    text = write_html_report(out).read_text(encoding="utf-8")
    page = _Page(text)
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in text
    assert "<i>x</i>" not in text and "&lt;i&gt;x&lt;/i&gt;" in text
    assert "figures/extra%20%3Cb%3E%26.png" in page.hrefs and "tables/odd%26name.csv" in page.hrefs
    assert "tables/empty.csv" in page.hrefs and "(no rows)" in text
    assert sorted(_embedded(page)) == sorted(_pictures(out))  # the extra picture too, not named by the README
    assert not [u for u in page.srcs + page.hrefs if SCHEME.match(u) and not u.startswith("data:image/")]
    assert "[a link](https://example.org)" in text  # Markdown links and images stay text: nothing to fetch


def test_long_tables_are_cut_and_pictures_past_the_budget_linked(report: ReportResult, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(report.out, out)
    rows = html_report.TABLE_MAX_ROWS + 50
    (out / "tables" / "long.csv").write_text("i\n" + "".join(f"{i}\n" for i in range(rows)))
    pictures = sorted(_pictures(out), key=len)
    monkeypatch.setattr(html_report, "EMBED_MAX_BYTES", len(pictures[0]))  # room for the smallest picture only
    text = write_html_report(out).read_text(encoding="utf-8")
    block = text.split('id="table-tables-long"', 1)[1].split("</section>", 1)[0]
    assert f"the first {html_report.TABLE_MAX_ROWS} of {rows} rows" in block
    assert block.count("<tr") == html_report.TABLE_MAX_ROWS + 1  # the header row and the first rows
    srcs = _Page(text).srcs
    embedded = [s for s in srcs if s.startswith("data:")]
    linked = [unquote(s) for s in srcs if not s.startswith("data:")]
    assert len(embedded) >= 1 and len(embedded) + len(linked) == len(pictures)
    assert all((out / p).is_file() and not SCHEME.match(p) for p in linked)
    assert f"{len(linked)} pictures beyond" in text


def _browser(profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))


PAGE_STATE = """
return {ready: document.readyState,
        images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt]),
        tables: Array.from(document.querySelectorAll('table')).map(t => t.querySelectorAll('tbody tr').length),
        cells: Array.from(document.querySelectorAll('table')).map(t => t.querySelectorAll('td').length),
        fetched: performance.getEntriesByType('resource').map(e => e.name)};
"""


def test_page_opens_in_chromium_with_every_picture_and_table(report: ReportResult, tmp_path: Path) -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium or ChromeDriver not installed (Debian packages chromium, chromium-driver; "
                    "`make test` tries `apt-get install -y chromium chromium-driver`)")
    pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
    from selenium.webdriver.support.ui import WebDriverWait

    broken = tmp_path / "broken"  # the check must see a picture that does not decode
    shutil.copytree(report.out, broken)
    next((broken / "figures").glob("*.png")).write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    write_html_report(broken)

    def loaded(d) -> dict | bool:  # type: ignore[no-untyped-def]
        state = d.execute_script(PAGE_STATE)
        return state if state["ready"] == "complete" and all(i[0] for i in state["images"]) else False

    n_pictures = sum(1 for sub in ("figures", "images") for _ in (report.out / sub).glob("*.png"))
    driver = _browser(tmp_path / "chromium-profile")
    try:
        driver.get(report.html.resolve().as_uri())
        state = WebDriverWait(driver, 30, 0.1).until(loaded)
        assert driver.title.startswith("etbench report: html-report")
        assert len(state["images"]) == n_pictures > 0
        assert [i[3] for i in state["images"] if i[1] == 0 or i[2] == 0] == []  # every picture decoded
        assert state["tables"] and min(state["tables"]) > 0 and min(state["cells"]) > 0
        assert not [u for u in state["fetched"] if not u.startswith(("data:", "file:"))]
        driver.get((broken / INDEX_HTML).resolve().as_uri())
        state = WebDriverWait(driver, 30, 0.1).until(loaded)
        assert sum(1 for i in state["images"] if i[1] == 0) == 1
    finally:
        driver.quit()
