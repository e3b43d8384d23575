"""Search spaces: a mergekit recipe whose values may be directives.

:mod:`.directives` (one searched value), :mod:`.space` (the parsed space), :mod:`.render` (a point to
a plain recipe and back), :mod:`.parse` (reading and validating a space file).
"""

from evomerge.space.directives import Directive
from evomerge.space.parse import SAMPLERS, load_space, parse_space
from evomerge.space.space import SearchSettings, Space

__all__ = ["Directive", "SearchSettings", "Space", "load_space", "parse_space", "SAMPLERS"]
