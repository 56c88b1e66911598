"""``index.html``: a report folder as one page to open in a browser, offline.

Built from what the report wrote, not from a list of names: the README's sections (provenance, reading notes, the
tables with their captions) rendered from Markdown, every table file under ``tables/`` (those the README does not
show inline rendered from their Markdown or CSV), every figure under ``figures/`` and picture under ``images/``
embedded as a PNG data URI with its caption (the figure's title from ``.etbench-report.json``) and links to its PDF
and CSV, and a list of every file in the folder. Nothing is fetched from a network: no scripts, no external CSS,
Markdown links and images are rendered as text. The page can be rebuilt alone: ``write_html_report(folder)``.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from markdown_it import MarkdownIt

INDEX_HTML = "index.html"
MANIFEST = ".etbench-report.json"  # written by etbench.analysis.report; read here for figure titles and order
README = "README.md"
# README sections whose content is a list of figure/image files: the page shows the pictures there instead
GALLERY_SECTIONS = {"Figures": "figures", "Images from the runs": "images"}
PICTURE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
EMBED_MAX_BYTES = 48 * 2**20  # pictures beyond this total are linked by relative path instead of embedded
TABLE_MAX_ROWS = 200  # a CSV-only table longer than this shows its first rows and links the full file

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
thead th{background:#f0f0f0}
.scroll{overflow-x:auto}
figure{margin:1em 0 2em;border-top:1px solid #eee;padding-top:.5em}
figure img{max-width:100%;height:auto}
.thumbs figure{display:inline-block;margin:0 1em 1em 0;border:none;vertical-align:top}
.thumbs img{image-rendering:pixelated;min-width:128px}
figcaption,.files{font-size:.9em;color:#444}
code{font-size:.9em}
"""


@dataclass
class _Folder:
    """The report's files by folder-relative path, and what the manifest says about them."""

    root: Path
    files: list[str]
    titles: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    by_stem: dict[str, list[str]] = field(default_factory=dict)  # "tables/x" → its .md, .tex, .csv
    rank: dict[str, int] = field(default_factory=dict)  # path or stem → its place in the manifest

    def __post_init__(self) -> None:
        for path in self.files:
            self.by_stem.setdefault(_stem(path), []).append(path)
        for i, path in enumerate(self.order):
            self.rank.setdefault(path, i)
            self.rank.setdefault(_stem(path), i)

    def under(self, folder: str) -> list[str]:
        return [f for f in self.files if f.startswith(folder + "/")]

    def ordered(self, names: Iterable[str]) -> list[str]:
        """``names`` (paths or stems) in the order the report wrote them (manifest), the rest alphabetically after."""
        return sorted(names, key=lambda n: (self.rank.get(n, len(self.order)), n))


def _scan(root: Path) -> _Folder:
    """Every file under ``root`` except hidden ones (the cache, the manifest) and the page itself."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and p.relative_to(root).as_posix() != INDEX_HTML)
    try:
        saved = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    return _Folder(root, [f.replace("\\", "/") for f in files],
                   titles={str(k): str(v) for k, v in saved.get("titles", {}).items()},
                   order=[str(p) for key in ("tables", "figures", "images") for p in saved.get(key, [])])


def _markdown() -> MarkdownIt:
    """CommonMark with pipe tables; raw HTML escaped, and links, autolinks and images left as text (no network)."""
    return MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "autolink", "image"])


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(path: str) -> str:
    """A relative link to a file of the report (percent-encoded: names may hold spaces or '#')."""
    return _e(quote(path))


def _links(paths: Iterable[str]) -> str:
    """'PNG · PDF · CSV' links to these files."""
    return " · ".join(f'<a href="{_href(p)}">{_e(Path(p).suffix.lstrip(".").upper() or Path(p).name)}</a>'
                      for p in paths)


def _stem(path: str) -> str:
    return path.rsplit(".", 1)[0]


def _readme_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The README's title line and its ``## `` sections as (heading, body); what precedes the first one is
    returned under the heading ''."""
    lines = text.splitlines()
    title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else "etbench report"
    sections: list[tuple[str, str]] = [("", "")]
    for line in lines[1:] if lines and lines[0].startswith("# ") else lines:
        if line.startswith("## "):
            sections.append((line[3:].strip(), ""))
        else:
            sections[-1] = (sections[-1][0], sections[-1][1] + line + "\n")
    return title, sections


def _tables_section(body: str, folder: _Folder, md: MarkdownIt, shown: set[str]) -> str:
    """The README's tables section rendered; each table that is also a file gets its links (md/tex/csv) below it.
    The stems of the tables found inline are added to ``shown``."""
    spans, cursor = [], 0
    for path in folder.ordered(p for p in folder.under("tables") if p.endswith(".md")):
        content = (folder.root / path).read_text().strip()
        at = body.find(content, cursor) if content else -1  # the README holds them in the order they were written
        at = body.find(content) if content and at < 0 else at
        if at >= 0:
            spans.append((at, at + len(content), _stem(path)))
            cursor = at + len(content)
    parts, pos = [], 0
    for start, end, stem in sorted(spans):
        if start < pos:
            continue  # a table repeated inside another one's span: already shown
        parts.append(md.render(body[pos:start]))
        parts.append(_table_block(md.render(body[start:end]), stem, folder))
        shown.add(stem)
        pos = end
    parts.append(md.render(body[pos:]))
    return "".join(parts)


def _table_block(rendered: str, stem: str, folder: _Folder) -> str:
    anchor = _e("table-" + stem.replace("/", "-"))
    files = folder.by_stem.get(stem, [])
    rendered = rendered.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    return (f'<section class="table" id="{anchor}">{rendered}'
            f'<p class="files">files: {_links(folder.ordered(files))}</p></section>\n')


def _csv_table(path: str, folder: _Folder) -> str:
    """A CSV-only table (the data behind a figure) as an HTML table, at most ``TABLE_MAX_ROWS`` rows."""
    try:
        frame = pd.read_csv(folder.root / path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    if frame.empty:
        return f"<h3>{_e(Path(path).stem)}</h3>\n<p>(no rows)</p>\n"
    note = (f"the first {TABLE_MAX_ROWS} of {len(frame)} rows (the CSV holds them all)"
            if len(frame) > TABLE_MAX_ROWS else f"{len(frame)} rows")
    body = frame.head(TABLE_MAX_ROWS).to_html(index=False, border=0, na_rep="", escape=True,
                                               float_format=lambda v: f"{v:.6g}")
    return f"<h3>{_e(Path(path).stem)}</h3>\n<p>{_e(note)}</p>\n{body}\n"


def _other_tables(folder: _Folder, md: MarkdownIt, shown: set[str]) -> str:
    """Tables under ``tables/`` the README did not show inline: from their Markdown file, else their CSV."""
    stems = folder.ordered({_stem(p) for p in folder.under("tables")} - shown)
    blocks = []
    for stem in stems:
        md_path, csv_path = stem + ".md", stem + ".csv"
        files = folder.by_stem.get(stem, [])
        if md_path in files:
            blocks.append(_table_block(md.render((folder.root / md_path).read_text()), stem, folder))
        elif csv_path in files:
            blocks.append(_table_block(_csv_table(csv_path, folder), stem, folder))
        else:
            blocks.append(f'<p class="files">{_e(Path(stem).name)}: {_links(files)}</p>\n')
    if not blocks:
        return ""
    return ('<h2 id="more-tables">More tables (not inline in the README: data behind figures and others)</h2>\n'
            + "".join(blocks))


class _Embedder:
    """Pictures as data URIs until ``EMBED_MAX_BYTES`` are spent, then as relative paths."""

    def __init__(self, root: Path) -> None:
        self.root, self.spent, self.linked = root, 0, 0

    def src(self, path: str) -> str:
        data = (self.root / path).read_bytes()
        if self.spent + len(data) > EMBED_MAX_BYTES:
            self.linked += 1
            return _href(path)
        self.spent += len(data)
        mime = PICTURE_SUFFIXES[Path(path).suffix.lower()]
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _gallery(sub: str, folder: _Folder, embed: _Embedder) -> str:
    """Every picture under ``sub/`` with its caption and links to the same figure's other files (PDF, CSV)."""
    by_stem: dict[str, list[str]] = {}
    for path in folder.under(sub):
        by_stem.setdefault(_stem(path), []).append(path)
    blocks = []
    for stem in folder.ordered(by_stem):
        paths = folder.ordered(by_stem[stem])
        pictures = [p for p in paths if Path(p).suffix.lower() in PICTURE_SUFFIXES]
        name = Path(stem).name
        title = folder.titles.get(name, "")
        caption = (f"<strong>{_e(name)}</strong>" + (f" — {_e(title)}" if title else "")
                   + f' <span class="files">({_links(paths)})</span>')
        if pictures:
            blocks.append(f'<figure id="{_e(sub + "-" + name)}"><img src="{embed.src(pictures[0])}" '
                          f'alt="{_e(title or name)}"><figcaption>{caption}</figcaption></figure>\n')
        else:
            blocks.append(f"<p>{caption}</p>\n")
    css = ' class="thumbs"' if sub == "images" else ""
    return f"<div{css}>{''.join(blocks)}</div>\n" if blocks else "<p>(none)</p>\n"


def _file_list(folder: _Folder) -> str:
    """Every file of the report, linked, by folder."""
    groups: dict[str, list[str]] = {}
    for path in folder.files:
        groups.setdefault(path.split("/", 1)[0] if "/" in path else ".", []).append(path)
    items = []
    for name, paths in groups.items():
        links = ", ".join(f'<a href="{_href(p)}">{_e(p)}</a>' for p in paths)
        items.append(f"<li><strong>{_e(name if name != '.' else 'top level')}</strong> ({len(paths)}): {links}</li>")
    return '<h2 id="files">All files</h2>\n<ul class="files">' + "\n".join(items) + "</ul>\n"


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def render_html_report(root: Path) -> str:
    """The page for the report folder ``root`` (see the module docstring)."""
    folder, md = _scan(Path(root)), _markdown()
    readme = (folder.root / README).read_text() if README in folder.files else ""
    title, sections = _readme_sections(readme)
    embed, shown = _Embedder(folder.root), set()
    body, done_galleries = [], set()
    for heading, text in sections:
        if heading:
            body.append(f'<h2 id="{_e(_slug(heading))}">{_e(heading)}</h2>\n')
        if heading in GALLERY_SECTIONS:
            body.append(_gallery(GALLERY_SECTIONS[heading], folder, embed))
            done_galleries.add(GALLERY_SECTIONS[heading])
        elif heading == "Tables":
            body.append(_tables_section(text, folder, md, shown))
        else:
            body.append(md.render(text))
    for heading, sub in GALLERY_SECTIONS.items():  # a folder the README does not list still shows
        if sub not in done_galleries and folder.under(sub):
            body.append(f'<h2 id="{_e(_slug(heading))}">{_e(heading)}</h2>\n{_gallery(sub, folder, embed)}')
    more = _other_tables(folder, md, shown)
    body.append(more)
    body.append(_file_list(folder))
    if embed.linked:
        body.insert(0, f"<p><em>{embed.linked} pictures beyond {EMBED_MAX_BYTES // 2**20} MiB are linked by "
                       f"relative path, not embedded: keep this page beside its folders.</em></p>\n")
    contents = " · ".join(f'<a href="#{_e(_slug(h))}">{_e(h)}</a>' for h, _ in sections if h)
    contents += ' · <a href="#more-tables">More tables</a>' if more else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
            f"<nav>{contents} · <a href=\"#files\">All files</a></nav>\n{''.join(body)}</body>\n</html>\n")


def write_html_report(root: Path) -> Path:
    """Write ``index.html`` into the report folder ``root``; return its path."""
    path = Path(root) / INDEX_HTML
    path.write_text(render_html_report(Path(root)), encoding="utf-8")
    return path
