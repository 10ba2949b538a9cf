"""Hydra's compose-time messages as :mod:`experiments.cli`'s one-line errors: a misspelled or unknown key, a value
of the wrong type, a config group given something that is not an option name. Imports neither hydra nor omegaconf."""
from __future__ import annotations

import difflib
import re

#: A config group given a value that is not an option name, nor a list of them (Hydra fails with a TypeError).
GROUP_VALUE = ("a config group takes one of its option names (e.g. tree=binary), not a list of lists; a tree of your "
               "own is a file in conf/tree (tree=<its name>) or paths on the command line: tree=none "
               "'tree.paths=[[0],[1],[0,0]]'")


#: Names a user brings from the Python API or other tools, with the key that means them here.
KNOWN_ELSEWHERE = {"max_rows": "the rows decoded at once are batch_size (with batch_mode=continuous: the most rows at "
                               "a time, new prompts joining as rows finish), e.g. batch_size=4",
                   "temperature": "did you mean sampling.temperature?", "k": "did you mean drafter.num_speculative_tokens?",
                   "tree.paths": "a tree's paths need its group chosen first: tree=none 'tree.paths=[[0],[1],[0,0]]' "
                                 "(or a file in conf/tree, tree=<its name>)"}


def misspelled_key(text: str, cause: BaseException | None) -> str | None:
    """Hydra's "Could not override 'k' ... use +k=v ... not in struct" as: the key is unknown, the closest known keys
    (when the config node is at hand), and how to list them; None for any other message."""
    match = re.match(r"Could not override '([^']+)'", text)
    if match is None or ("not in struct" not in text and re.search(r"Key '[^']+' not in '", text) is None):
        return None
    key = match.group(1)
    parent = getattr(cause, "parent_node", None)
    known = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = (f"did you mean {' or '.join(prefix + c for c in close)}? " if close else
            f"{KNOWN_ELSEWHERE[key]}{' ' if KNOWN_ELSEWHERE[key].endswith('?') else '; '}" if key in KNOWN_ELSEWHERE else
            f"the keys there are {sorted(known)}; " if known else "")
    # a top-level key cannot be added (check_added_keys): '+' helps only an argument its node's _target_ takes
    added = (f"; {prefix[:-1]}'s _target_ takes it as an argument: add it with a leading + (+{key}=...)"
             if prefix and key not in KNOWN_ELSEWHERE and _takes_argument(parent, key.rsplit(".", 1)[-1], prefix[:-1])
             else "")
    return f"{key} is not a key of this config: {hint}--cfg job prints every key{added}"


def _takes_argument(node: object, name: str, where: str) -> bool:
    """Whether ``node`` has a ``_target_`` that takes an argument ``name`` (False when it cannot be told)."""
    if not hasattr(node, "keys") or "_target_" not in node:
        return False
    from experiments.overrides import target_takes

    try:
        return target_takes(node, name, where)
    except Exception:  # noqa: BLE001  (a target that cannot be imported: the hint is only left out)
        return False


#: What a typed config key takes, by the type Hydra could not convert an override's value to.
TYPE_FIXES = {"Integer": "a whole number", "Float": "a number (e.g. 0.7)", "bool": "true or false"}


def wrong_type(text: str) -> str | None:
    """Hydra's "Error merging override k=v. Value 'v' ... could not be converted to Integer" (or Float, "is not a
    valid bool") as the key, the value and what the key takes; None for any other message."""
    match = re.match(r"Error merging override ([^=\s]+)=(.*?)\. Value '.*' (?:of type '\w+' could not be converted "
                     r"to (Integer|Float)|is not a valid (bool))", text)
    if match is None:
        return None
    key, value, kind = match.group(1), match.group(2), match.group(3) or match.group(4)
    several = value.startswith("[") and value.endswith("]") and len(value) > 2
    sweep = f"; to run several values, sweep them: -m {key}={value[1:-1].replace(' ', '')}" if several else ""
    return f"{key}={value!r}: {key} takes {TYPE_FIXES[kind]}{sweep}"


def null_value(text: str) -> str | None:
    """Hydra's "Error merging override k=null. field 'k' is not Optional" as the key and what it needs; None for any
    other message."""
    match = re.match(r"Error merging override ([^=\s]+)=(null|None|~)\. field '[^']+' is not Optional", text)
    if match is None:
        return None
    key = match.group(1)
    return f"{key}={match.group(2)}: {key} cannot be null, give it a value (--cfg job prints every key's default)"
