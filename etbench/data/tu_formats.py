"""Raw readers for the graph classification text formats, returning plain numpy arrays numbered globally from 0.

Two layouts (Morris et al., "TUDataset", 2020; Zhang et al., "DGCNN", AAAI 2018):
- TU: comma-separated ``<NAME>_A.txt`` (1-based ``row, col`` node pairs), ``_graph_indicator.txt`` (graph id per
  node, 1-based), ``_graph_labels.txt`` and optionally ``_node_labels.txt``, ``_node_attributes.txt``,
  ``_edge_labels.txt``; in a zip (members matched by base name, the official zips hold ``NAME//NAME_A.txt``) or a
  directory.
- DGCNN: ``<NAME>.txt`` = a line with the graph count, then per graph ``n label`` and n lines
  ``tag degree nb_1 … nb_degree [attributes…]`` with 0-based neighbours local to the graph; optional
  ``10fold_idx/{train,test}_idx-<k>.txt`` with 0-based graph indices.
Every check raises ``DatasetError`` naming the file (zip member), the line and what was expected. Features, label
mapping and conversion to torch_geometric happen in ``tudataset.py``.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from etbench.data import DatasetError

TU_LAYOUT = ("TU text files <NAME>_A.txt, <NAME>_graph_indicator.txt, <NAME>_graph_labels.txt (optionally "
             "_node_labels.txt, _node_attributes.txt, _edge_labels.txt), in a .zip or a directory")
DGCNN_LAYOUT = ("DGCNN text <NAME>/<NAME>.txt: graph count, then per graph 'n label' and n lines "
                "'tag degree neighbours… [attributes…]', optionally <NAME>/10fold_idx/{train,test}_idx-<k>.txt")
_JUNK = ("__MACOSX/", ".DS_Store")


@dataclass
class RawGraphSet:
    """Many small graphs as read from disk; node ids are global and 0-based, edges exactly as stored."""

    graph_of_node: np.ndarray  # (N,) int64, 0-based graph index, non-decreasing
    edges: np.ndarray  # (2, E) int64 global node ids, file order, endpoints always in the same graph
    graph_labels: np.ndarray  # (G,) int64 as stored (any integers; mapped to 0..C-1 later)
    node_labels: np.ndarray | None = None  # (N,) int64
    node_attributes: np.ndarray | None = None  # (N, F) float64
    edge_labels: np.ndarray | None = None  # (E,) int64, aligned with edges
    stored_folds: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # (train, test) 0-based graph indices


class TextSource:
    """The text files of one dataset, from a zip archive or a directory, addressed by base name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            self.members = {str(p.relative_to(path)): p for p in files}
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"{path}: not a readable zip archive ({e}); expected {TU_LAYOUT}") from e
            self.members = {m: path for m in self._zip.namelist() if not m.endswith("/")}
        self.members = {m: p for m, p in self.members.items() if not any(j in m for j in _JUNK)}

    def find(self, basename: str) -> str | None:
        """The one member whose base name is ``basename`` (None when absent; an error when ambiguous)."""
        hits = [m for m in self.members if m.rsplit("/", 1)[-1] == basename]
        if len(hits) > 1:
            raise DatasetError(f"{self.path}: {len(hits)} files named {basename!r} ({hits}); expected one")
        return hits[0] if hits else None

    def label(self, member: str) -> str:
        return f"{self.path}:{member}" if self._zip is not None else str(self.members[member])

    def text(self, member: str) -> str:
        try:
            raw = self._zip.read(member) if self._zip is not None else self.members[member].read_bytes()
            return raw.decode("utf-8")
        except (zipfile.BadZipFile, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise DatasetError(f"{self.label(member)}: corrupt or truncated ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def parse_table(text: str, where: str, columns: int | None, dtype: type) -> np.ndarray:
    """A comma-separated numeric table: (rows,) when ``columns`` is 1, else (rows, columns); None = any, uniform.

    numpy's C parser reads well-formed files; when it fails, a line-by-line scan names the first bad line.
    """
    if not text.strip():
        return np.empty((0,) if columns == 1 else (0, columns or 0), dtype)
    if "\n\n" in text.strip().replace("\r", ""):  # numpy skips blank lines, which would shift every line number
        _raise_bad_line(text, where, columns, dtype, None)
    try:
        a = np.loadtxt(io.StringIO(text), delimiter=",", dtype=dtype, ndmin=2, comments=None)
    except ValueError as e:
        _raise_bad_line(text, where, columns, dtype, e)
    if a.shape[0] and columns is not None and a.shape[1] != columns:
        _raise_bad_line(text, where, columns, dtype, None)
    return a[:, 0] if columns == 1 else a


def _raise_bad_line(text: str, where: str, columns: int | None, dtype: type, err: Exception | None) -> NoReturn:
    want = f"{columns} comma-separated {dtype.__name__} value(s)" if columns else f"{dtype.__name__} values"
    width = None
    for i, line in enumerate(text.splitlines(), start=1):
        parts = line.split(",")
        if not line.strip():
            raise DatasetError(f"{where} line {i}: empty line; expected {want}")
        if (columns is not None and len(parts) != columns) or (columns is None and width not in (None, len(parts))):
            raise DatasetError(f"{where} line {i}: {line.strip()!r} has {len(parts)} value(s); expected {want}"
                               + ("" if columns else f" ({width} as on line 1)"))
        width = len(parts)
        for p in parts:
            try:
                dtype(p.strip())
            except ValueError:
                raise DatasetError(f"{where} line {i}: {p.strip()!r} is not a number; expected {want}") from None
    raise DatasetError(f"{where}: unreadable table ({err}); expected {want}")


# -------------------------------------------------------------------------------------------------------- TU format


def tu_name(source: TextSource) -> str:
    """The dataset name ``NAME`` of the one ``NAME_A.txt`` in ``source``."""
    names = sorted({m.rsplit("/", 1)[-1].removesuffix("_A.txt") for m in source.members if m.endswith("_A.txt")})
    if len(names) != 1:
        raise DatasetError(f"{source.path}: expected exactly one '<NAME>_A.txt', found {names or 'none'}; "
                           f"expected {TU_LAYOUT}")
    return names[0]


def read_tu(source: TextSource, name: str) -> RawGraphSet:
    """Read and cross-check the TU files of dataset ``name`` (the prefix of its file names)."""

    def table(part: str, columns: int | None, dtype: type, required: bool) -> tuple[np.ndarray | None, str]:
        member = source.find(f"{name}_{part}.txt")
        if member is None:
            if required:
                raise DatasetError(f"{source.path}: no '{name}_{part}.txt'; expected {TU_LAYOUT}")
            return None, ""
        where = source.label(member)
        return parse_table(source.text(member), where, columns, dtype), where

    indicator, ind_where = table("graph_indicator", 1, int, True)
    labels, lab_where = table("graph_labels", 1, int, True)
    pairs, a_where = table("A", 2, int, True)
    assert indicator is not None and labels is not None and pairs is not None
    n, g = indicator.size, labels.size
    if n == 0 or g == 0:
        raise DatasetError(f"{ind_where if n == 0 else lab_where}: empty; expected one line per "
                           f"{'node' if n == 0 else 'graph'}")
    bad = np.flatnonzero((indicator < 1) | (indicator > g))
    if bad.size:
        raise DatasetError(f"{ind_where} line {bad[0] + 1}: graph id {indicator[bad[0]]} outside 1..{g} "
                           f"(the {g} lines of {lab_where})")
    down = np.flatnonzero(np.diff(indicator) < 0)
    if down.size:
        raise DatasetError(f"{ind_where} line {down[0] + 2}: graph id {indicator[down[0] + 1]} after "
                           f"{indicator[down[0]]}; expected non-decreasing graph ids (each graph's nodes together)")
    empty = np.setdiff1d(np.arange(1, g + 1), indicator)
    if empty.size:
        raise DatasetError(f"{ind_where}: graph {empty[0]} has no node ({empty.size} such graph(s)); truncated? "
                           f"{lab_where} lists {g} graphs")
    bad = np.flatnonzero((pairs < 1).any(1) | (pairs > n).any(1))
    if bad.size:
        raise DatasetError(f"{a_where} line {bad[0] + 1}: node pair {pairs[bad[0]].tolist()} outside 1..{n} "
                           f"(the {n} lines of {ind_where})")
    edges = (pairs.T - 1).astype(np.int64).reshape(2, -1)
    graph_of_node = (indicator - 1).astype(np.int64)
    cross = np.flatnonzero(graph_of_node[edges[0]] != graph_of_node[edges[1]])
    if cross.size:
        raise DatasetError(f"{a_where} line {cross[0] + 1}: nodes {pairs[cross[0]].tolist()} lie in different "
                           "graphs; expected every edge inside one graph")
    node_labels, nl_where = table("node_labels", 1, int, False)
    attrs, at_where = table("node_attributes", None, float, False)
    edge_labels, el_where = table("edge_labels", 1, int, False)
    for arr, where, rows, of in ((node_labels, nl_where, n, ind_where), (attrs, at_where, n, ind_where),
                                 (edge_labels, el_where, edges.shape[1], a_where)):
        if arr is not None and arr.shape[0] != rows:
            raise DatasetError(f"{where}: {arr.shape[0]} lines; expected {rows}, one per line of {of}")
    if attrs is not None and not np.isfinite(attrs).all():
        raise DatasetError(f"{at_where} line {np.flatnonzero(~np.isfinite(attrs).all(1))[0] + 1}: "
                           "non-finite attribute; expected finite numbers")
    return RawGraphSet(graph_of_node=graph_of_node, edges=edges, graph_labels=labels.astype(np.int64),
                       node_labels=None if node_labels is None else node_labels.astype(np.int64),
                       node_attributes=attrs, edge_labels=None if edge_labels is None else edge_labels.astype(np.int64))


# ----------------------------------------------------------------------------------------------------- DGCNN format


def read_dgcnn(source: TextSource, name: str) -> RawGraphSet:
    """Read ``<name>.txt`` in the DGCNN layout and its ``10fold_idx`` files when present.

    The text is tokenised once with numpy (a per-line Python parse of D&D's 335k node lines takes seconds); every
    line is then checked against the layout, whole graphs at a time.
    """
    member = source.find(f"{name}.txt")
    if member is None:
        raise DatasetError(f"{source.path}: no '{name}.txt'; expected {DGCNN_LAYOUT}")
    where = source.label(member)
    tok = _tokenise(source.text(member), where)
    head = tok.integers(0, "the number of graphs")
    if head.size != 1 or head[0] < 1:
        raise DatasetError(f"{where} line 1: {head.tolist()}; expected the number of graphs")
    num_graphs = int(head[0])
    labels, tags, attrs, sizes, src, dst = [], [], [], [], [], []
    i, offset, width = 1, 0, -1
    for gi in range(num_graphs):
        what = f"graph {gi + 1} of {num_graphs}"
        hdr = tok.integers(i, f"'nodes label' of {what}")
        if hdr.size != 2 or hdr[0] < 1:
            raise DatasetError(f"{where} line {i + 1}: {hdr.tolist()}; expected 'nodes label' of {what}")
        n = int(hdr[0])
        rows = np.arange(i + 1, i + 1 + n)
        if rows[-1] >= tok.count.size:
            raise DatasetError(f"{where} line {tok.count.size + 1}: the file ends after {tok.count.size - i - 1} of "
                               f"the {n} node lines of {what} (truncated?)")
        tag, deg, nb, extra = _node_lines(tok, rows, n, where, what)
        lo, hi = int(extra.min()), int(extra.max())
        if lo != hi or width not in (-1, lo):
            bad = rows[np.flatnonzero(extra != (width if width != -1 else extra[0]))[0]]
            raise DatasetError(f"{where} line {bad + 1}: {tok.count[bad] - 2} values after 'tag degree' where "
                               "other node lines differ; expected the same number of attributes on every node line")
        width = lo
        if width:
            at = (tok.first[rows] + 2 + deg)[:, None] + np.arange(width)
            attrs.append(tok.values[at])
        labels.append(int(hdr[1]))
        tags.append(tag)
        src.append(np.repeat(np.arange(n), deg) + offset)
        dst.append(nb + offset)
        sizes.append(n)
        i, offset = i + 1 + n, offset + n
    rest = np.flatnonzero(tok.count[i:])
    if rest.size:
        raise DatasetError(f"{where} line {i + rest[0] + 1}: text after the {num_graphs} graphs line 1 announces")
    return RawGraphSet(graph_of_node=np.repeat(np.arange(num_graphs), sizes),
                       edges=np.stack([np.concatenate(src), np.concatenate(dst)]).astype(np.int64),
                       graph_labels=np.asarray(labels, np.int64), node_labels=np.concatenate(tags),
                       node_attributes=np.concatenate(attrs) if width > 0 else None,
                       stored_folds=_dgcnn_folds(source, num_graphs))


_WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f", np.uint8)  # what str.split() splits on (ASCII)


@dataclass
class _Tokens:
    """The whitespace-separated numbers of a text, with each line's first token index and token count."""

    values: np.ndarray  # (T,) float64
    first: np.ndarray  # (L,) int64
    count: np.ndarray  # (L,) int64
    where: str

    def integers(self, i: int, what: str) -> np.ndarray:
        """The values of line ``i`` (0-based) as integers."""
        if i >= self.count.size:
            raise DatasetError(f"{self.where} line {i + 1}: the file ends here; expected {what} (truncated?)")
        vals = self.values[self.first[i]:self.first[i] + self.count[i]]
        if not np.array_equal(vals, np.round(vals)):
            raise DatasetError(f"{self.where} line {i + 1}: {vals.tolist()[:8]}; expected integers ({what})")
        return vals.astype(np.int64)


def _tokenise(text: str, where: str) -> _Tokens:
    if not text.strip():
        raise DatasetError(f"{where}: empty; expected {DGCNN_LAYOUT}")
    if not text.isascii():
        pos = next(k for k, c in enumerate(text) if not c.isascii())
        raise DatasetError(f"{where} line {text.count(chr(10), 0, pos) + 1}: non-ASCII character; expected numbers")
    b = np.frombuffer(text.encode("ascii"), np.uint8)
    ws = np.isin(b, _WHITESPACE)
    starts = np.flatnonzero(~ws & np.concatenate([[True], ws[:-1]]))
    line_of = np.cumsum(b == 10)[starts]
    lines = int((b == 10).sum()) + (b[-1] != 10)  # a final newline ends the last line, it opens no new one
    count = np.bincount(line_of, minlength=lines)
    digits = b[~ws] - 48
    if digits.size and digits.max() <= 9 and np.diff(starts, append=b.size).max() < 16:
        values = _unsigned_integers(b, ws, starts)  # the common all-digits case, without a Python string per token
    else:
        values = _parse_words(text.split(), line_of, where)
    if not np.isfinite(values).all():
        raise DatasetError(f"{where} line {line_of[np.flatnonzero(~np.isfinite(values))[0]] + 1}: non-finite value")
    return _Tokens(values=values, first=np.cumsum(count) - count, count=count, where=where)


def _unsigned_integers(b: np.ndarray, ws: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Decimal digit runs → values: each digit times 10^(digits left of the run's end)."""
    idx = np.flatnonzero(~ws)
    is_start = np.zeros(b.size, bool)
    is_start[starts] = True
    token = np.cumsum(is_start)[idx] - 1  # the token each digit belongs to
    length = np.bincount(token, minlength=starts.size)
    place = (np.cumsum(length) - 1)[token] - np.arange(idx.size)  # digits after this one in its token
    return np.bincount(token, weights=(b[idx] - 48) * 10.0 ** place, minlength=starts.size)


def _parse_words(words: list[str], line_of: np.ndarray, where: str) -> np.ndarray:
    assert len(words) == line_of.size, "tokeniser and str.split disagree"
    try:
        return np.array(words, dtype=np.float64)
    except ValueError:
        for k, w in enumerate(words):
            try:
                float(w)
            except ValueError:
                raise DatasetError(f"{where} line {line_of[k] + 1}: {w[:30]!r} is not a number") from None
        raise


def _node_lines(tok: _Tokens, rows: np.ndarray, n: int, where: str,
                what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tags, degrees, local neighbour ids (concatenated) and attribute widths of one graph's node lines."""
    c, f = tok.count[rows], tok.first[rows]
    expected = f"'tag degree neighbours… [attributes…]' with neighbours in 0..{n - 1} ({what})"
    short = np.flatnonzero(c < 2)
    if short.size:
        raise DatasetError(f"{where} line {rows[short[0]] + 1}: {c[short[0]]} value(s); expected {expected}")
    head = tok.values[f[:, None] + np.arange(2)]
    deg = head[:, 1]
    bad = np.flatnonzero((head != np.round(head)).any(1) | (deg < 0) | (deg > c - 2))
    if bad.size:
        k = bad[0]
        raise DatasetError(f"{where} line {rows[k] + 1}: tag {head[k, 0]:g}, degree {deg[k]:g} with {c[k] - 2} "
                           f"value(s) after them; expected {expected}")
    deg = deg.astype(np.int64)
    within = np.arange(int(deg.sum())) - np.repeat(np.cumsum(deg) - deg, deg)
    nb = tok.values[np.repeat(f + 2, deg) + within]
    bad = np.flatnonzero((nb != np.round(nb)) | (nb < 0) | (nb >= n))
    if bad.size:
        line = np.repeat(rows, deg)[bad[0]]
        raise DatasetError(f"{where} line {line + 1}: neighbour {nb[bad[0]]:g}; expected {expected}")
    return head[:, 0].astype(np.int64), deg, nb.astype(np.int64), c - 2 - deg


_FOLD_FILE = re.compile(r"(train|test)_idx-(\d+)\.txt$")


def _dgcnn_folds(source: TextSource, num_graphs: int) -> tuple[tuple[np.ndarray, np.ndarray], ...] | None:
    """The shipped ``(train, test)`` index pairs, ordered by fold number; None when the archive has none."""
    found: dict[int, dict[str, str]] = {}
    for m in source.members:
        hit = _FOLD_FILE.search(m.rsplit("/", 1)[-1])
        if hit and "10fold_idx/" in m:
            found.setdefault(int(hit.group(2)), {})[hit.group(1)] = m
    if not found:
        return None
    folds = []
    for k in sorted(found):
        if set(found[k]) != {"train", "test"}:
            raise DatasetError(f"{source.path}: fold {k} has only {sorted(found[k])}_idx-{k}.txt; expected both "
                               "train and test")
        pair = []
        for part in ("train", "test"):
            where = source.label(found[k][part])
            idx = parse_table(source.text(found[k][part]), where, 1, int).astype(np.int64)
            bad = np.flatnonzero((idx < 0) | (idx >= num_graphs))
            if bad.size:
                raise DatasetError(f"{where} line {bad[0] + 1}: graph index {idx[bad[0]]} outside 0..{num_graphs - 1}")
            pair.append(idx)
        if np.intersect1d(*pair).size:
            raise DatasetError(f"{source.label(found[k]['test'])}: shares graphs with train_idx-{k}.txt; expected "
                               "disjoint train and test indices")
        folds.append((pair[0], pair[1]))
    return tuple(folds)
