"""The one naming rule for jobs, adapters and services (torch-free: the operator imports it too).

A name is a DNS-1123 subdomain of at most ``MAX_NAME_LEN`` characters: lowercase letters, digits,
``-`` and ``.``, each dot-separated part starting and ending with a letter or digit. So a name never
holds ``:`` (the separator of the Redis key layout, see ``protocol``), ``/``, ``..``, whitespace or
``@`` (the separator of ``name@vN``), and is always a safe single path component.
"""

from __future__ import annotations

import re

MAX_NAME_LEN = 63
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
VERSIONED = re.compile(r"(?P<adapter>[^@]+)@v(?P<version>[0-9]{1,9})")
# The worker's --service is <namespace>.<InferenceService name> in a cluster: two names and a dot.
MAX_SERVICE_LEN = 2 * MAX_NAME_LEN + 1


class InvalidNameError(ValueError):
    """A job, adapter or service name that breaks the naming rule; the message says which rule."""


def validate_name(name: object, kind: str = "name", max_len: int = MAX_NAME_LEN) -> str:
    """``name`` if it follows the rule, else ``InvalidNameError`` naming ``kind`` (job, adapter...)."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"the {kind} name must be a non-empty string")
    if len(name) > max_len:
        raise InvalidNameError(f"invalid {kind} name {name[:20]!r}...: at most {max_len} characters")
    if NAME.fullmatch(name) is None:  # fullmatch: "$" would let a trailing newline through
        raise InvalidNameError(f"invalid {kind} name {name!r}: use lowercase letters, digits, '-' and '.', "
                               "starting and ending with a letter or digit (a DNS-1123 name)")
    return name


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LEN and NAME.fullmatch(name) is not None


def validate_service(service: object) -> str:
    return validate_name(service, "service", MAX_SERVICE_LEN)


def split_version(reference: str) -> tuple[str, int | None]:
    """``"a@v3"`` -> ``("a", 3)``; ``"a"`` -> ``("a", None)``; the adapter part is validated."""
    match = VERSIONED.fullmatch(reference)
    adapter, version = (match["adapter"], int(match["version"])) if match else (reference, None)
    validate_name(adapter, "adapter")
    return adapter, version
