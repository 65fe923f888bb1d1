"""A comparison report as report.md and report.html: the same sections, two renderings."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from micro_arch.report.tables import markdown_table


@dataclass
class Report:
    title: str
    intro: list[str]
    left_out: list[str]  # one line per run directory that could not be compared
    notes: list[str]  # fairness flags and notes on single runs
    best: list[str]  # one line per ranked metric, the deciding one first
    table: object  # DataFrame of strings: a "metric" column, then one column per run
    bold: set = field(default_factory=set)  # (row position, run column) of the best values
    footnotes: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file in the report folder, caption)
    samples: dict[str, dict[str, str]] = field(default_factory=dict)  # prompt -> run -> continuation
    samples_note: str = ""
    arms: object = None  # DataFrame of strings, one row per seed group (report.groups.arms_table), or None


def _sections(report: Report):
    """(heading, bullet lines) of the sections made of lines; empty ones are left out."""
    sections = (("Runs left out", report.left_out), ("Fairness", report.notes), ("Verdicts", report.best))
    for heading, lines in sections:
        if lines:
            yield heading, lines


def to_markdown(report: Report) -> str:
    import pandas as pd

    table = report.table.map(lambda v: str(v).replace("\n", "<br>"))
    for row, col in report.bold:
        table.iat[row, table.columns.get_loc(col)] = f"**{table.iat[row, table.columns.get_loc(col)]}**"
    out = [f"# {report.title}", ""] + [line + "\n" for line in report.intro]
    for heading, lines in _sections(report):
        out += [f"## {heading}", "", *[f"- {line}" for line in lines], ""]
    if report.arms is not None and len(report.arms):
        out += ["## Seed groups", "", markdown_table(report.arms), ""]
    out += ["## Results", "", markdown_table(table), *[f"{note}  " for note in report.footnotes], ""]
    if report.images:
        out += ["## Loss curves", ""] + [f"![{caption}]({name})\n" for name, caption in report.images]
    if report.samples:
        out += ["## Samples", "", report.samples_note, ""]
        for prompt, texts in report.samples.items():
            cells = {run: html.escape(prompt + text).replace("\n", "<br>") for run, text in texts.items()}
            out += [f"### Prompt `{prompt!r}`", "", markdown_table(pd.DataFrame([cells])), ""]
    return "\n".join(out).rstrip() + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
td.num{text-align:right}th{background:#f4f4f4}pre{white-space:pre-wrap;margin:0;font-size:.85em}
img{max-width:100%}.foot{color:#555;font-size:.9em}"""


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(report.title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(report.title)}</h1>"]
    out += [f"<p>{e(line)}</p>" for line in report.intro]
    for heading, lines in _sections(report):
        out += [f"<h2>{e(heading)}</h2>", "<ul>", *[f"<li>{e(line)}</li>" for line in lines], "</ul>"]
    if report.arms is not None and len(report.arms):
        out += ["<h2>Seed groups</h2>", _html_table(report.arms)]
    cols = list(report.table.columns)
    out += ["<h2>Results</h2>", "<table>", "<tr>" + "".join(f"<th>{e(str(c))}</th>" for c in cols) + "</tr>"]
    for i, row in enumerate(report.table.itertuples(index=False)):
        cells = []
        for col, value in zip(cols, row):
            text = e(str(value)).replace("\n", "<br>")
            cells.append(f"<th>{text}</th>" if col == cols[0] else
                         f"<td class='num'>{'<b>' + text + '</b>' if (i, col) in report.bold else text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    out += [f"<p class='foot'>{e(note)}</p>" for note in report.footnotes]
    if report.images:
        out.append("<h2>Loss curves</h2>")
        out += [f"<figure><img src='{e(name)}' alt='{e(caption)}'>"
                f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption in report.images]
    if report.samples:
        out += ["<h2>Samples</h2>", f"<p>{e(report.samples_note)}</p>"]
        for prompt, texts in report.samples.items():
            out += [f"<h3>Prompt <code>{e(repr(prompt))}</code></h3>", "<table><tr>"
                    + "".join(f"<th>{e(run)}</th>" for run in texts) + "</tr><tr>"
                    + "".join(f"<td><pre><b>{e(prompt)}</b>{e(text)}</pre></td>" for text in texts.values())
                    + "</tr></table>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_table(df) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(str(c))}</th>" for c in df.columns) + "</tr>"
    body = ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False)]
    return "<table>" + head + "".join(body) + "</table>"


def write_report(report: Report, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "report.md", folder / "report.html"]
    written[0].write_text(to_markdown(report))
    written[1].write_text(to_html(report))
    return written
