"""`make site`: the static site built from a tiny executed set, checked as files and in a real
headless Chromium (Debian's ``chromium``; skipped without it unless VIDRET_REQUIRE_BROWSER=1,
which .ci/run sets). Screenshots are kept in runs/site-screenshots/ (git-ignored) to look at.
"""
import base64
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import time
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import nbformat
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# tools/ is no package: load the script `make site` runs from its path
_spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
build_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_site)
SCREENSHOTS = ROOT / "runs" / "site-screenshots"
PAGES = ["index.html", "00_alpha.html", "01_beta.html"]
README = """# project

## Results (default profile)

| notebook | here | the paper's claim holds here? |
|---|---|---|
| 01 Beta | 17.5 ± 1.1 | partly: RESULTS-ROW-MARKER |

## Next section

not part of the results
"""


def png_figure(title: str) -> str:
    """A 200x150 PNG with a line and a title, base64 as a notebook stores a figure."""
    image = Image.new("RGB", (200, 150), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(10, 140), (100, 100), (190, 10)], fill="steelblue", width=3)
    draw.text((10, 5), title, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def executed_notebooks(folder: Path) -> None:
    """Two notebooks with the outputs an executed vidret notebook has: figures, a table, a verdict."""
    out = nbformat.v4
    alpha = out.new_notebook(cells=[
        out.new_markdown_cell("# 00 · Alpha\n\nThe first notebook."),
        out.new_code_cell("show()", execution_count=1, outputs=[
            out.new_output("stream", name="stdout", text="VERDICT-MARKER: the claim holds\n"),
            out.new_output("display_data", data={"image/png": png_figure("alpha"), "text/plain": "<Figure>"}),
        ]),
    ])
    beta = out.new_notebook(cells=[
        out.new_markdown_cell("# 01 · Beta\n\n| variant | R@1 |\n|---|---|\n| meanP | 17.5 |"),
        out.new_code_cell("table()", execution_count=1, outputs=[
            out.new_output("execute_result", execution_count=1, data={
                "text/html": "<table><tr><th>variant</th><th>R@1</th></tr><tr><td>TABLE-MARKER</td><td>18.7</td></tr></table>",
                "text/plain": "table"}),
            out.new_output("display_data", data={"image/png": png_figure("beta 1"), "text/plain": "<Figure>"}),
            out.new_output("display_data", data={"image/png": png_figure("beta 2"), "text/plain": "<Figure>"}),
        ]),
    ])
    folder.mkdir(parents=True)
    nbformat.write(alpha, folder / "00_alpha.ipynb")
    nbformat.write(beta, folder / "01_beta.ipynb")
    (folder / "00_alpha.stamp").write_text("not a notebook")  # what reproduce leaves beside them


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    executed_notebooks(tmp / "executed")
    (tmp / "README.md").write_text(README, encoding="utf-8")
    out = tmp / "site"
    out.mkdir()
    (out / "02_removed.html").write_text("a page of a notebook that no longer exists")
    start = time.perf_counter()
    build_site.main(["--executed", str(tmp / "executed"), "--out", str(out),
                     "--readme", str(tmp / "README.md"), "--profile", "smoke"])  # what `make site` runs
    print(f"site built in {time.perf_counter() - start:.1f} s")
    return out


class Resources(HTMLParser):
    """What a page asks the browser to load: script src, link href, url()/@import in <style>."""

    def __init__(self):
        super().__init__()
        self.urls, self.images, self.links, self._in_style = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.urls.append(attrs["src"])
        elif tag == "link" and attrs.get("href"):
            self.urls.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        self._in_style = tag == "style"

    def handle_data(self, data):
        if self._in_style:
            for url, imported in re.findall(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""", data):
                self.urls.append(url or imported)

    def handle_endtag(self, tag):
        self._in_style = False


def parsed(page: Path) -> Resources:
    parser = Resources()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_pages_hold_figures_tables_verdicts_and_links(site, tmp_path):
    assert sorted(p.name for p in site.glob("*.html")) == sorted(PAGES)  # the stale page is gone
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "RESULTS-ROW-MARKER" in index and "not part of the results" not in index
    assert "executed with profile smoke" in index
    alpha, beta = (site / "00_alpha.html").read_text(), (site / "01_beta.html").read_text()
    assert "VERDICT-MARKER" in alpha and "TABLE-MARKER" in beta and "<td>meanP</td>" in beta
    # every figure is embedded in its page
    assert [src[:22] for src in parsed(site / "00_alpha.html").images] == ["data:image/png;base64,"]
    assert [src[:22] for src in parsed(site / "01_beta.html").images] == ["data:image/png;base64,"] * 2
    # navigation: index -> every page, every page -> index and its neighbours
    assert {"00_alpha.html", "01_beta.html"} <= set(parsed(site / "index.html").links)
    assert {"index.html", "01_beta.html"} <= set(parsed(site / "00_alpha.html").links)
    assert {"index.html", "00_alpha.html"} <= set(parsed(site / "01_beta.html").links)
    # the same executed notebooks give the same bytes
    build_site.main(["--executed", str(site.parent / "executed"), "--out", str(tmp_path),
                     "--readme", str(site.parent / "README.md"), "--profile", "smoke"])
    assert all((tmp_path / page).read_bytes() == (site / page).read_bytes() for page in PAGES)


def test_no_page_loads_anything_from_the_network(site):
    for page in PAGES:
        remote = [u for u in parsed(site / page).urls if re.match(r"(https?:)?//", u.strip())]
        assert remote == [], f"{page} loads {remote}: it would not read offline"


def test_missing_executed_notebooks_or_results_section_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}.*run `make reproduce PROFILE=default` first"):
        build_site.main(["--executed", str(tmp_path), "--out", str(tmp_path / "site"), "--profile", "default"])
    executed_notebooks(tmp_path / "executed")
    (tmp_path / "README.md").write_text("# project\n\n## Install\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="README.md has no '## Results' section"):
        build_site.main(["--executed", str(tmp_path / "executed"), "--out", str(tmp_path / "site"),
                         "--readme", str(tmp_path / "README.md")])


# Appended to a copy of each page: on load, it records what the browser rendered in a hidden <pre>.
PROBE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const out = {
    images: [...document.images].map((img) => img.naturalWidth),
    links: [...document.links].filter((a) => a.protocol === "file:" && !a.getAttribute("href").startsWith("#"))
      .map((a) => a.href),
    resources: performance.getEntriesByType("resource").map((entry) => entry.name),
    scrollWidth: root.scrollWidth, clientWidth: root.clientWidth, textLength: document.body.innerText.length,
  };
  const pre = document.createElement("pre");
  pre.id = "vidret-probe"; pre.hidden = true; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    """Path of Debian's chromium; skips the test without it, fails under VIDRET_REQUIRE_BROWSER=1."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "no chromium on PATH (Debian: apt-get install --no-install-recommends chromium)"
        if os.environ.get("VIDRET_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; VIDRET_REQUIRE_BROWSER=1 requires it")
        pytest.skip(reason)
    return found


def render(browser: str, page: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``page`` (with the probe) in headless Chromium at 1280x900; screenshot it; return the probe."""
    probed = page.with_name(f"_probe_{page.name}")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--window-size=1280,900", f"--screenshot={screenshot}", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    probed.unlink()
    found = re.search(r'<pre id="vidret-probe" hidden="">(.*?)</pre>', result.stdout)
    assert found, f"chromium rendered no probe for {page.name}: rc {result.returncode}\n{result.stderr[-2000:]}"
    return json.loads(unescape(found.group(1)))


@pytest.mark.slow  # three Chromium starts
def test_site_renders_in_headless_chromium(site, tmp_path):
    browser = chromium()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expected_images = {"index.html": 0, "00_alpha.html": 1, "01_beta.html": 2}
    for page in PAGES:
        shot = SCREENSHOTS / page.replace(".html", ".png")
        probe = render(browser, site / page, shot, tmp_path / "chromium-profile")
        assert len(probe["images"]) == expected_images[page] and all(w > 0 for w in probe["images"]), probe
        assert [r for r in probe["resources"] if not r.startswith(("file:", "data:"))] == [], probe
        assert probe["scrollWidth"] <= probe["clientWidth"], f"{page} overflows the 1280 px window: {probe}"
        assert probe["textLength"] > 50, probe
        # the links the browser resolved: the index (its nav bar too) to every page, a page to the index
        # and its neighbour
        targets = {Path(unquote(urlparse(href).path)) for href in probe["links"]}
        assert targets == {site / name for name in PAGES if name != page or page == "index.html"}, targets
        with Image.open(shot) as image:  # not blank: text and figures in many colours
            assert image.size == (1280, 900)
            grey = image.convert("L")
            dark = sum(grey.histogram()[:128]) / (1280 * 900)
            assert len(image.convert("RGB").getcolors(1280 * 900)) > 20 and 0.001 < dark < 0.5, (shot, dark)
