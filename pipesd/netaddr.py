"""Network addresses given on the command line: ``HOST:PORT`` or ``[IPv6]:PORT``."""

from __future__ import annotations

import ipaddress
import re

# A host name or IPv4 literal has no colon; an IPv6 literal must be bracketed so that its
# colons cannot be confused with the port separator.
_HOSTPORT = re.compile(r"(?:\[(?P<v6>[^\s\[\]]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>[0-9]+)")


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """``"host:7070"`` -> ``("host", 7070)``; ``"[::1]:7070"`` -> ``("::1", 7070)``.

    ``what`` names the value in the error (an option such as ``--listen``). Anything else,
    including a port outside 0..65535, raises ValueError with one line.
    """
    m = _HOSTPORT.fullmatch(text)
    if m is None:
        raise ValueError(f"{what} expects HOST:PORT or [IPv6]:PORT, got {text!r}")
    host = m["host"]
    if m["v6"] is not None:
        host = m["v6"]
        try:
            ipaddress.IPv6Address(host)  # accepts a %scope suffix
        except ValueError:
            raise ValueError(
                f"{what} expects an IPv6 address between the brackets, got {text!r}"
            ) from None
    port = int(m["port"])
    if port > 65535:
        raise ValueError(f"{what} expects a port in 0..65535, got {port} in {text!r}")
    return host, port


__all__ = ["parse_hostport"]
