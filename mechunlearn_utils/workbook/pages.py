"""The executed workbook, readable in a browser: each notebook as HTML and an index page.

* `export_html(nb_path)`        RESULTS_DIR/<stem>/<stem>.ipynb -> <stem>.html next to it (nbconvert)
* `write_index(results_dir)`    RESULTS_DIR/index.html: the notebook map (README's table), each
                                notebook's figures (its PNGs) and headline numbers (`HEADLINES`)

`make workbook` writes both (the runner calls them); open results/index.html.
"""

from __future__ import annotations

import fnmatch
import html
import json
import re
from pathlib import Path

from mechunlearn_utils.core.paths import REPO_ROOT, atomic_write_text

# The few metrics.json keys (fnmatch patterns, `*` spans dots) the index shows per notebook.
HEADLINES = {
    "00_setup": ["athletes.n_known", "facts.n_known", "recall.*.accuracy"],
    "01_factual_recall_circuits": ["clean_logit_diff_mean", "resid_handoff_layer", "logit_lens_final_p_norm",
                                   "head_patch_restore_max"],
    "02_localization": ["sports.*.mlp_layers", "sports.*.attn_layers", "sports.probe.saturation_layer"],
    "02b_depth_sweep": ["window.*.forget_normal", "window.*.lr", "window.*.took"],
    "03_editing_and_unlearning": ["*.forget.question.p_true", "*.maintain.normal.p_true"],
    "04_probing_latent_knowledge": ["*.subject.true_acc.back_half", "*.subject.edit_acc.back_half"],
    "05_attacks": ["*.edit.heldout_p_true", "*.edit.forget_p_true"],
    "06_weight_masking": ["*.smallest_n", "*.forget_p_true"],
    "07_results": ["verdict.*"],
}
MAX_HEADLINES = 12  # per notebook
MAX_LIST = 8        # values shown of a list metric

# | `stem` | what you learn (may hold a literal "|") | writes |
_MAP_ROW = re.compile(r"^\|\s*`(?P<stem>[0-9]{2}[a-z]?_[^`]+)`\s*\|(?P<learn>.*)\|(?P<writes>[^|]*)\|\s*$")


def notebook_map(readme: Path = REPO_ROOT / "README.md") -> dict[str, str]:
    """{stem: what you learn}, read from the README's "Notebook map" table (one source of truth)."""
    if not readme.exists():
        return {}
    text = readme.read_text(encoding="utf-8")
    start = text.find("## Notebook map")
    rows = {}
    for line in text[start:].splitlines()[1:] if start >= 0 else []:
        if line.startswith("## "):
            break
        m = _MAP_ROW.match(line)
        if m:
            rows[m["stem"]] = m["learn"].strip()
    return rows


def export_html(nb_path) -> Path:
    """Write the executed notebook as HTML next to it (figures embedded); returns the HTML path."""
    from nbconvert import HTMLExporter

    nb_path = Path(nb_path)
    body, _ = HTMLExporter(template_name="lab").from_filename(str(nb_path))
    out = nb_path.with_suffix(".html")
    atomic_write_text(out, body)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        shown = ", ".join(_fmt(v) for v in value[:MAX_LIST])
        return f"[{shown}{', ...' if len(value) > MAX_LIST else ''}]"
    return str(value)


def headline_numbers(stem: str, metrics: dict) -> list[tuple[str, str]]:
    """(key, formatted value) for the keys of `metrics` matching HEADLINES[stem], in pattern order."""
    rows, seen = [], set()
    for pattern in HEADLINES.get(stem, []):
        for key in sorted(k for k in metrics if fnmatch.fnmatchcase(k, pattern)):
            if key not in seen and len(rows) < MAX_HEADLINES:
                seen.add(key)
                rows.append((key, _fmt(metrics[key])))
    return rows


def _section(results_dir: Path, stem: str, learn: str) -> str:
    folder = results_dir / stem
    e = html.escape
    parts = [f'<section id="{e(stem)}"><h2>{e(stem)}</h2>']
    if learn:
        parts.append(f"<p>{e(learn.replace('`', '').replace('**', ''))}</p>")
    page = folder / f"{stem}.html"
    if page.exists():
        parts.append(f'<p><a href="{e(stem)}/{e(page.name)}">the executed notebook</a></p>')
    elif not folder.exists():
        parts.append("<p><em>not run yet</em></p>")
    metrics_path = folder / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>"
                       for k, v in headline_numbers(stem, metrics))
        smoke = " (SMOKE run)" if metrics.get("smoke") else ""
        if rows:
            parts.append(f"<table><caption>headline numbers{smoke}</caption>{rows}</table>")
    for png in sorted(folder.rglob("*.png")) if folder.exists() else []:
        rel = png.relative_to(results_dir).as_posix()
        parts.append(f'<figure><img src="{e(rel)}" alt="{e(png.stem)}" loading="lazy">'
                     f"<figcaption>{e(png.stem)}</figcaption></figure>")
    return "".join(parts) + "</section>"


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
          "img{max-width:100%;border:1px solid #ddd}figure{display:inline-block;width:48%;margin:.5%}"
          "td{padding:0 1em 0 0}caption{text-align:left;font-weight:bold}section{border-top:1px solid #ccc}")


def write_index(results_dir, stems: list[str] | None = None) -> Path:
    """Write RESULTS_DIR/index.html over `stems` (default: the README's notebook map, then any
    other notebook folder present); returns its path."""
    results_dir = Path(results_dir)
    learn = notebook_map()
    if stems is None:
        present = {p.parent.name for p in results_dir.glob("*/*.ipynb")} | {
            p.parent.name for p in results_dir.glob("*/metrics.json")}
        stems = list(learn) + sorted(present - set(learn))
    toc = "".join(f'<li><a href="#{html.escape(s)}">{html.escape(s)}</a></li>' for s in stems)
    body = "".join(_section(results_dir, s, learn.get(s, "")) for s in stems)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Mechanistic Unlearning workbook: results"
            f"</title><style>{_STYLE}</style></head><body><h1>Mechanistic Unlearning workbook: results</h1>"
            f"<ul>{toc}</ul>{body}</body></html>")
    out = results_dir / "index.html"
    atomic_write_text(out, page)
    return out
