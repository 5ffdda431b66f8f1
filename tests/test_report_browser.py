"""report.html rendered by a real browser (Debian's chromium, headless), read back from the DOM."""

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from harness.reports import write_report
from harness.results.verdict import judge

from synthetic import plant, write_sweep

MATRIX = """\
# make sweep MATRIX=b
axes: {quant: [bf16, nf4, int8]}
seeds: [0, 1]
baseline: {quant: bf16}
"""
INJECTED = ("<script>document.title='pwned';document.documentElement.setAttribute('data-pwned','1')</script>"
            "<img src=x onerror=\"document.title='pwned'\">")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(page) -> str:
    if CHROMIUM is None:
        if os.environ.get("QRL_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (QRL_REQUIRE_BROWSER is set) but not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={page.parent / 'chromium-profile'}",
         "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Dom(HTMLParser):
    """Just enough of the DOM: elements with their attributes and the text inside chosen ones."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.title, self._in_title, self.completions, self._in_completion = "", False, [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        self._in_title = tag == "title"
        if tag == "td" and "completion" in attrs.get("class", ""):
            self._in_completion = True
            self.completions.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_completion = False
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title and not self.title:
            self.title = data
        if self._in_completion:
            self.completions[-1] += data

    def find(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def test_report_html_in_chromium(tmp_path):
    root, runs = write_sweep(tmp_path, MATRIX, "b")
    plant(runs, "quant=bf16", [0.55, 0.56], completion=INJECTED)
    plant(runs, "quant=nf4", [0.53, 0.55])
    plant(runs, "quant=int8", [0.40, 0.41])
    judge(root)
    write_report(root, tmp_path / "reports" / "b")
    dom = Dom(rendered_dom(tmp_path / "reports" / "b" / "report.html"))

    rows = dom.find("tr", **{"class": "cell-row"})
    assert [(r["data-cell"], r["data-status"]) for r in rows] == [
        ("quant=bf16", "Converges"), ("quant=nf4", "Converges"), ("quant=int8", "Does not converge")]
    for metric in ("reward/mean", "eval/reward", "kl", "entropy"):
        assert len(dom.find("svg", data_metric=metric)) == 3, metric  # one curve chart per cell
    for metric in ("memory", "tokens_per_s", "step_s"):
        assert len(dom.find("svg", data_metric=metric)) == 1, metric
    assert len([a for t, a in dom.elements if t == "polyline"]) >= 3 * 4 * 3  # seeds + mean (+ baseline) per chart

    # the injected markup is shown as text and none of it ran
    assert dom.title.startswith("b: verified configurations")
    assert not any("data-pwned" in a for _, a in dom.elements)
    assert not dom.find("img") and not [a for t, a in dom.elements if t == "script"]
    assert INJECTED in dom.completions
