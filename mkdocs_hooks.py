"""mkdocs hook: render the docstrings' Sphinx roles as code with a link.

influx's docstrings cross-reference with Sphinx roles (:class:`~influx.Solver`),
which mkdocstrings leaves as text: ``:class:<code>~influx.Solver</code>`` in
the HTML. This hook turns each into the object's name in code, wrapped in an
optional autorefs reference: a link where the object is documented, plain
code where it is not, and never a warning. A relative name (:meth:`fit`) is
looked up from the documented object it appears under, outwards, among the
objects of the same page.
"""

from __future__ import annotations

import bisect
import html
import re
from typing import Any

ROLE = re.compile(
    r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([^<]+)</code>"
)
#: The anchors mkdocstrings gives documented objects (``id="influx.Influence.fit"``).
ANCHOR = re.compile(r'\bid="((?:influx|influx_torch|influx_jax)(?:\.[\w]+)*)"')


def on_page_content(html_text: str, **kwargs: Any) -> str:
    """Replace the Sphinx roles of one page's HTML (mkdocs event)."""
    anchors = [(m.start(), m.group(1)) for m in ANCHOR.finditer(html_text)]
    positions = [position for position, _ in anchors]
    known = {name for _, name in anchors}

    def reference(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", html.unescape(match.group(2)).strip()
        target = target.removesuffix("()")
        title = target.rsplit(".", 1)[-1] if short else target
        if not target.startswith("influx"):
            index = bisect.bisect_left(positions, match.start()) - 1
            context = anchors[index][1] if index >= 0 else ""
            while context:
                if f"{context}.{target}" in known:
                    target = f"{context}.{target}"
                    break
                context = context.rpartition(".")[0]
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )

    return ROLE.sub(reference, html_text)
