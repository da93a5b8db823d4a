"""The Lua scripts that make each Redis step atomic, one file each (`<name>.lua`, shipped with the package).

Each is read once, when first asked for; its comments say what it takes (KEYS, ARGV) and answers. A script may begin
with constants it is given when loaded (`local NAME = <number>`), so the file runs as it is in `redis-cli --eval`
and in the tests, which run every script on its own.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["load"]


@functools.cache
def _text(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def load(name: str, **constants: int) -> str:
    """The script `name`, with each `local NAME = <number>` line of `constants` set to its value. Raises KeyError
    when a constant given is not in the script (a renamed one must not be silently ignored)."""
    text = _text(name)
    for constant, value in constants.items():
        text, found = re.subn(rf"^local {constant} = \d+", f"local {constant} = {int(value)}", text, flags=re.M)
        if not found:
            raise KeyError(f"{name}.lua has no constant {constant}")
    return text
