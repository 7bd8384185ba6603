"""Static HTML site of the notebooks ``make reproduce`` executed: ``make site PROFILE=default``.

Reads ``executed/<profile>/NN_*.ipynb`` as they are (nothing is executed) and writes
``_site/<profile>/``: ``index.html`` (README.md's results section and a link to every notebook)
and one ``NN_*.html`` per notebook, with every figure, table, printed verdict and traceback,
links to the previous and next notebook and back to the index. Images are embedded as data
URIs and no page loads a script, style or font from the network, so the folder reads offline
from a file:// path and can be copied anywhere as one unit.

Built with nbconvert's HTML exporter: the Jupyter project's own renderer (installed with
JupyterLab), it draws every output type the notebooks have exactly as JupyterLab does, and its
templates are Jinja blocks, so one small template (``tools/site_template/vidret/``) removes the
CDN scripts of nbconvert's ``lab`` template and adds the navigation bar. The results table is
README.md's ``## Results`` section, which carries the verdicts beside the numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "site_template"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"  # the numbered notebooks, as vidret_lib.reproduce runs them


def results_section(readme: Path) -> str:
    """The markdown of README.md's ``## Results`` section, heading included, up to the next ``## ``.

    Raises:
        SystemExit: when the file has no line starting with ``## Results``.
    """
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Results")), None)
    if start is None:
        raise SystemExit(f"build_site: {readme} has no '## Results' section; the index page takes "
                         "its results table from there (add the section, or pass --readme FILE)")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip()


def notebook_title(nb: nbformat.NotebookNode, stem: str) -> str:
    """The first ``# `` heading of the first markdown cell, else the file's stem."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
            break
    return stem


def index_notebook(pages: list[tuple[str, str]], results: str, profile: str) -> nbformat.NotebookNode:
    """The index page as a notebook of markdown cells: rendered by the same template as the pages.

    The cells have fixed ids (nbformat draws random ones), so the same inputs give the same page.
    """
    links = "\n".join(f"- [{title}]({href})" for href, title in pages)
    intro = (f"# vidret: executed notebooks\n\nEach page is a notebook as `make reproduce PROFILE={profile}` "
             f"executed it (`executed/{profile}/`), with every figure, table and verdict.\n\n{links}")
    cells = [nbformat.v4.new_markdown_cell(intro, id="notebooks"),
             nbformat.v4.new_markdown_cell(results, id="results")]
    if profile != "default":
        cells.append(nbformat.v4.new_markdown_cell(
            f"The results table above is README.md's, measured with the default profile; the pages "
            f"here were executed with profile `{profile}`.", id="profile"))
    return nbformat.v4.new_notebook(cells=cells)


def build_site(executed: Path, out: Path, readme: Path, profile: str) -> list[Path]:
    """Render every ``NN_*.ipynb`` in ``executed`` and an index into ``out``; return the pages written.

    ``out`` is created; HTML files in it that this build does not write (a notebook since removed)
    are deleted. Markdown image paths are resolved from ``notebooks/``, where the notebooks were
    written, and embedded.

    Raises:
        SystemExit: when ``executed`` holds no numbered notebook (run ``make reproduce`` first),
            or ``readme`` has no results section.
    """
    paths = sorted(executed.glob(NOTEBOOK_GLOB))
    if not paths:
        raise SystemExit(f"build_site: no executed notebooks ({NOTEBOOK_GLOB}) in {executed}; "
                         f"run `make reproduce PROFILE={profile}` first")
    results = results_section(readme)
    exporter = HTMLExporter(template_name="vidret", extra_template_basedirs=[str(TEMPLATES)],
                            embed_images=True)
    notebooks = [nbformat.read(path, as_version=4) for path in paths]
    pages = [(f"{path.stem}.html", notebook_title(nb, path.stem)) for path, nb in zip(paths, notebooks)]

    def render(nb: nbformat.NotebookNode, name: str, title: str, prev, next_) -> Path:
        resources = {"metadata": {"name": title, "path": str(ROOT / "notebooks")},
                     "vidret": {"profile": profile, "prev": prev, "next": next_}}
        html, _ = exporter.from_notebook_node(nb, resources=resources)
        target = out / name
        target.write_text(html, encoding="utf-8")
        return target

    def link(i: int):
        return {"href": pages[i][0], "title": pages[i][1]} if 0 <= i < len(pages) else None

    out.mkdir(parents=True, exist_ok=True)
    written = [render(index_notebook(pages, results, profile), "index.html", "vidret: executed notebooks",
                      None, link(0))]
    for i, nb in enumerate(notebooks):
        written.append(render(nb, pages[i][0], pages[i][1], link(i - 1), link(i + 1)))
    for stale in set(out.glob("*.html")) - set(written):
        stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="the profile make reproduce ran (default: default)")
    parser.add_argument("--executed", type=Path, help="executed notebooks (default: executed/<profile>)")
    parser.add_argument("--out", type=Path, help="output folder, its *.html replaced (default: _site/<profile>)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="file with the '## Results' section")
    args = parser.parse_args(argv)
    executed = args.executed or ROOT / "executed" / args.profile
    out = args.out or ROOT / "_site" / args.profile
    start = time.perf_counter()
    written = build_site(executed, out, args.readme, args.profile)
    print(f"site: {len(written) - 1} notebook pages and the index in {time.perf_counter() - start:.1f} s; "
          f"open {(out / 'index.html').resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
