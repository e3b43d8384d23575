"""Search spaces: a mergekit recipe whose values may be directives (:mod:`.space`)."""

from evomerge.space.space import Directive, SearchSettings, Space, load_space, parse_space

__all__ = ["Directive", "SearchSettings", "Space", "load_space", "parse_space"]
