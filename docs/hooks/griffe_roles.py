"""Griffe extension: Sphinx-style roles in evomerge's docstrings render as inline code, and
``Example:`` sections as Google style's examples (their doctests as code).

The docstrings name other objects as ``:func:`evomerge.x.y```, ``:class:`~Merger```... The API
pages show them as code (``y``, ``Merger``): mkdocstrings does not resolve Sphinx roles, and most
names are short forms that would not resolve as cross-references.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")
# Google style's examples section is "Examples:"; "Example:" would render the doctest as prose.
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(
                lambda m: (
                    f"`{m.group(1).rsplit('.', 1)[-1] if m.group(0).count('~') else m.group(1)}`"
                ),
                obj.docstring.value,
            )
