"""How ``xl`` names a domain on its command line: by id or by name (cf. Xen
tools/xl/xl_utils.c: find_domain(), and libxl_name_to_domid())."""

from __future__ import annotations

from .libxl import Libxl, ToolstackError


async def find_domain(lx: Libxl, text: str, *, guest: bool = True) -> int:
    """The domid ``text`` names: all digits is an id, anything else a name.  With ``guest``
    (every command that acts on a guest), Domain-0 is refused."""
    if text.isdigit():
        domid = int(text)
    else:
        named = [d["domid"] for d in await lx.hv.domain_list() if d["name"] == text]
        if text == "Domain-0":
            named = [0]
        if not named:
            raise ToolstackError(f"{text!r} is not a domain name or id")
        domid = int(named[0])
    if guest and domid == 0:
        raise ToolstackError("domain 0 is the control domain (this host); give a guest")
    return domid


async def domain_name(lx: Libxl, domid: int) -> str:
    """``xl domname``: the name of ``domid``."""
    if domid == 0:
        return "Domain-0"
    for d in await lx.hv.domain_list():
        if d["domid"] == domid:
            return str(d["name"])
    raise ToolstackError(f"domain {domid} does not exist")
