"""Module-name regexes from users and config files, compiled safely.

Targets such as ``r".*\\.(query|value)$"`` come from code, the CLI and adapter config files that
may come from anywhere. Python's ``re`` has no time limit, and a pattern that nests an unbounded
repeat inside another repeat (``(a+)+b``, ``(.*)*x``, ``(a|ab)*c``) can backtrack for an
exponential time on a name it does not match. Such patterns are refused before anything is
matched; the rule is a little stricter than needed (``(\\.\\w+)*`` is refused too, though its dot
keeps it linear), and the message says how to rewrite them.
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python >= 3.11
    import re._parser as _sre  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

from peftlab.config import clip
from peftlab.errors import PeftlabError

MAX_PATTERN_CHARS = 4096
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)


def compile_pattern(pattern: Any, what: str, error: type[PeftlabError]) -> re.Pattern[str]:
    """``pattern`` compiled, or ``error`` naming ``what`` and saying what is wrong with it."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
        raise error(f"{what}: expected a regular expression of at most {MAX_PATTERN_CHARS} characters, "
                    f"got {clip(repr(pattern))}")
    try:
        parsed = _sre.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:  # the last two: "a{99999999999}", "((((..."
        raise error(f"{what}: {clip(repr(pattern))} is not a valid regular expression: {e}") from None
    if _nested_repeat(parsed, inside_repeat=False):
        raise error(f"{what}: {clip(repr(pattern))} repeats a group that itself holds an unbounded "
                    "repeat or alternatives (like (a+)+ or (a|b.*)*), which can take exponential time "
                    "to match; write it without the nesting, e.g. '.*' once, or list the names "
                    "as separate targets")
    return compiled


def _nested_repeat(node: Any, inside_repeat: bool) -> bool:
    """Whether a parsed pattern has an unbounded repeat or a branch inside a repeat of more
    than one."""
    if isinstance(node, (list, tuple, _sre.SubPattern)):
        items = node.data if isinstance(node, _sre.SubPattern) else node
        for item in items:
            # Opcodes by identity: an opcode and a character code can be equal ints.
            if isinstance(item, tuple) and len(item) == 2 and any(item[0] is r for r in _REPEATS):
                low, high, body = item[1]
                if inside_repeat and high == _sre.MAXREPEAT:
                    return True
                if _nested_repeat(body, inside_repeat or high > 1):
                    return True
            elif isinstance(item, tuple) and len(item) == 2 and item[0] is _sre.BRANCH:
                if inside_repeat:
                    return True
                if _nested_repeat(item[1][1], inside_repeat):
                    return True
            elif _nested_repeat(item, inside_repeat):
                return True
    return False
