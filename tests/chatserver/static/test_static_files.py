"""The browser client's files as shipped: the vendored libraries are the recorded npm releases,
and the page's own code never parses HTML from strings."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[3] / "chatserver" / "static"
VENDOR = STATIC / "vendor"


def test_vendored_libraries_are_the_recorded_releases() -> None:
    table = (VENDOR / "README.md").read_text()
    rows = re.findall(
        r"^\| `(\S+\.js)` \| `(\S+)` \| (\S+) \| [^|]+ \| `[^`]+` \| `([0-9a-f]{64})` \|$",
        table,
        re.M,
    )
    assert {name for name, *_ in rows} == {p.name for p in VENDOR.glob("*.js")}
    for name, package, version, digest in rows:
        data = (VENDOR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} is not the recorded file"
        banner = {"markdown-it": f"markdown-it {version}", "dompurify": f"DOMPurify {version}"}
        assert banner[package].encode() in data[:300], f"{name}: not {package} {version}"
        assert (VENDOR / f"LICENSE.{package}").is_file()


def test_the_pages_own_code_never_parses_html_from_strings() -> None:
    sinks = re.compile(r"\binnerHTML\b|\bouterHTML\b|insertAdjacentHTML|document\.write|\beval\(")
    for name in ("app.js", "chatclient.js", "markdown.js"):
        code = (STATIC / name).read_text()
        found = [m.group(0) for m in sinks.finditer(code)]
        assert found == [], f"{name} uses {found}"
    # the Markdown renderer keeps raw HTML as text and returns nodes, not markup
    markdown = (STATIC / "markdown.js").read_text()
    assert "html: false" in markdown and "RETURN_DOM_FRAGMENT: true" in markdown
