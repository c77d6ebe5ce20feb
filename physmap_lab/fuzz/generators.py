"""Pure generators of random and damaged input for every interface of the stack.

Each is a seeded :class:`random.Random`, so a run replays from its seed: xenstore request
frames, hypercall frames, QMP lines and save-image mutations.  Nothing here does I/O.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Final

import msgpack

from xenstored_sim.wire import HEADER, Op

#: Domains the fuzzer introduces and aims at; the well-behaved guest is outside this range.
FUZZ_DOMIDS: Final = tuple(range(1, 9))
GOOD_DOMID: Final = 1000

_NAMES: Final = (b"a", b"b", b"vm", b"device", b"backend", b"x-1", b"_", b"@", b"data", b"0")
_VALID_OPS: Final = (
    Op.DIRECTORY,
    Op.READ,
    Op.GET_PERMS,
    Op.WATCH,
    Op.UNWATCH,
    Op.TRANSACTION_START,
    Op.TRANSACTION_END,
    Op.INTRODUCE,
    Op.RELEASE,
    Op.GET_DOMAIN_PATH,
    Op.WRITE,
    Op.MKDIR,
    Op.RM,
    Op.SET_PERMS,
    Op.IS_DOMAIN_INTRODUCED,
    Op.RESUME,
    Op.SET_TARGET,
    Op.RESET_WATCHES,
    Op.DIRECTORY_PART,
    Op.CONTROL,
)
_CONTROL: Final = (b"check", b"help", b"log", b"print", b"quota", b"quota-soft", b"logfile")


class FrameMaker(random.Random):
    """Random and mutated request frames.  ``frame()`` returns the bytes and whether the
    daemon is expected to drop the connection after them."""

    def path(self) -> bytes:
        parts = [self.choice(_NAMES) for _ in range(self.randint(0, 4))]
        roll = self.random()
        if roll < 0.4:
            base = b"/local/domain/%d" % self.choice(FUZZ_DOMIDS)
            return base + b"".join(b"/" + p for p in parts)
        if roll < 0.6:
            return b"/".join(parts) or b"a"  # relative
        if roll < 0.7:
            return self.choice((b"@introduceDomain", b"@releaseDomain", b"/local/domain/", b"/"))
        return b"/" + b"/".join(parts)

    def perms(self) -> bytes:
        n = self.randint(1, 4)
        return b"".join(
            b"%c%d\0" % (self.choice(b"nrwbx"), self.choice((*FUZZ_DOMIDS, 0, 99)))
            for _ in range(n)
        )

    def payload(self, op: int) -> bytes:
        """A plausible payload for ``op``."""
        domid = self.choice(FUZZ_DOMIDS)
        if op in (Op.WRITE,):
            return self.path() + b"\0" + self.randbytes(self.choice((0, 1, 8, 64)))
        if op == Op.SET_PERMS:
            return self.path() + b"\0" + self.perms()
        if op in (Op.WATCH, Op.UNWATCH):
            return self.path() + b"\0tok%d\0" % self.randint(0, 3)
        if op == Op.TRANSACTION_END:
            return self.choice((b"T\0", b"F\0", b"X\0", b""))
        if op == Op.TRANSACTION_START:
            return b"\0"
        if op == Op.INTRODUCE:
            return b"%d\0%d\0%d\0" % (domid, self.randint(0, 9), self.randint(0, 3))
        if op in (Op.RELEASE, Op.RESUME, Op.GET_DOMAIN_PATH, Op.IS_DOMAIN_INTRODUCED):
            return b"%d\0" % self.choice((domid, 0, 0x7FF0, 65536))
        if op == Op.SET_TARGET:
            return b"%d\0%d\0" % (domid, self.choice(FUZZ_DOMIDS))
        if op == Op.DIRECTORY_PART:
            return self.path() + b"\0%d\0" % self.randint(0, 20)
        if op == Op.CONTROL:
            return self.choice(_CONTROL) + b"\0" + self.choice((b"", b"1\0", b"set\0x\0"))
        if op == Op.RESET_WATCHES:
            return b""
        return self.path() + b"\0"

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.randint(1, 3)):
            kind = self.randrange(7)
            i = self.randint(0, len(buf))
            if kind == 0 and buf:
                buf[min(i, len(buf) - 1)] ^= 1 << self.randrange(8)
            elif kind == 1:
                buf[i:i] = b"\0"
            elif kind == 2:
                buf[i:i] = self.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"))
            elif kind == 3:
                del buf[i:]
            elif kind == 4:
                buf[i:i] = self.choice((b"//", b"/", b"..", b"%", b"\n", b" "))
            elif kind == 5:
                buf += self.randbytes(self.randint(1, 32))
            else:
                buf[i:i] = buf[: self.randint(0, 64)]
        return bytes(buf[:4096])

    def tx_id(self) -> int:
        return self.choice((0, 0, 0, 0, 1, 2, 3, self.getrandbits(32)))

    def frame(self, req_id: int) -> tuple[bytes, bool]:
        roll = self.random()
        if roll < 0.55:
            op = int(self.choice(_VALID_OPS))
            body = self.payload(op)
            if self.random() < 0.6:
                body = self.mutate(body)
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.80:
            op = self.choice((15, 16, 20, 23, 24, 25, 26, 99, 0xFFFF, self.getrandbits(32)))
            if self.random() < 0.5:
                op = self.randrange(30)
            body = self.randbytes(self.randint(0, 64))
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.997:
            # A valid request, unchanged: keeps the tree and transactions interesting.
            op = int(self.choice((Op.WRITE, Op.MKDIR, Op.READ, Op.DIRECTORY, Op.RM, Op.WATCH)))
            body = self.payload(op)
            return HEADER.pack(op, req_id, self.tx_id(), len(body)) + body, False
        if roll < 0.999:
            length = self.choice((4097, 65536, 1 << 31, 0xFFFFFFFF))
            return HEADER.pack(Op.WRITE, req_id, 0, length) + b"/x\0y", True
        # A truncated header: the connection ends here.
        whole = HEADER.pack(Op.READ, req_id, 0, 3) + b"/a\0"
        return whole[: self.randint(1, 15)], True


# --------------------------------------------------------------------------------------------
# hypervisor-sim: hypercall frames

#: The fuzz's own domain: frames name it, or a number near it, or one picked at random.
_HV_TEMPLATES: Final[tuple[tuple[str, dict[str, object]], ...]] = (
    ("version", {}),
    ("domain_list", {}),
    ("domain_getinfo", {"domid": 0}),
    ("domain_pause", {"domid": 0}),
    ("domain_unpause", {"domid": 0}),
    ("populate_physmap", {"domid": 0, "gfns": [16, 17, 18]}),
    ("decrease_reservation", {"domid": 0, "gfns": [16]}),
    ("add_to_physmap", {"domid": 0, "space": "gmfn", "idx": 16, "gpfn": 40}),
    ("relocate_memory", {"domid": 0, "src_gfn": 17, "dst_gfn": 64, "nr": 2}),
    ("pin_memory_cacheattr", {"domid": 0, "start": 64, "end": 65, "type": 6}),
    ("sequence", {"calls": [["p2m", {"domid": 0}], ["add_to_physmap", {"domid": 0}]]}),
    ("p2m", {"domid": 0}),
    ("map_foreign", {"domid": 0, "gfns": [0, 1, 16, 99999]}),
    ("ioreq_server_create", {"domid": 0}),
    ("ioreq_server_destroy", {"domid": 0, "id": 1}),
    ("ioreq_complete", {"seq": 1, "data": 0}),
    ("guest", {"domid": 0, "ops": [{"op": "mem_read", "gpa": 0, "len": 8}]}),
    ("guest", {"domid": 0, "ops": [{"op": "pio_read", "port": 0x1CE, "size": 2}]}),
    ("guest_driver", {"domid": 0, "device": "stdvga", "action": "framebuffer", "params": {}}),
    ("restrict", {"domid": 0}),
    ("shadow_op", {"domid": 0, "op": "enable_logdirty"}),
    ("shadow_op", {"domid": 0, "op": "clean"}),
    ("shadow_op", {"domid": 0, "op": "off"}),
    ("track_dirty_vram", {"domid": 0, "first_pfn": 16, "nr": 3}),
    ("modified_memory", {"domid": 0, "first_pfn": 16, "nr": 2}),
    ("no_such_call", {}),
)


class HypercallFrameMaker(random.Random):
    """Random and mutated hypercall frames aimed at domain ``domid``.  ``frame()`` returns the
    bytes and whether the daemon is expected to drop the connection after them."""

    def __init__(self, seed: int, domid: int) -> None:
        super().__init__(seed)
        self.domid = domid

    def leaf(self) -> object:
        return self.choice(
            (
                None,
                True,
                -1,
                0,
                self.domid,
                self.domid + 1,
                1 << 40,
                -(1 << 63),
                (1 << 64) - 1,
                1.5,
                "",
                "x" * self.randint(1, 40),
                b"\x00\xff",
                [],
                [1, "a"],
                {},
                {"op": "mem_write", "gpa": 0, "data": b"hi"},
            )
        )

    def retype(self, doc: object) -> object:
        """``doc`` with one value inside it replaced, dropped or given a new key."""
        if isinstance(doc, dict) and doc and self.random() < 0.75:
            out = dict(doc)
            key = self.choice(sorted(out, key=repr))
            roll = self.random()
            if roll < 0.15:
                del out[key]
            elif roll < 0.25:
                out[self.choice(("extra", "id", "call", "args", 1, b"k"))] = self.leaf()
            else:
                out[key] = self.retype(out[key])
            return out
        if isinstance(doc, list) and doc and self.random() < 0.75:
            i = self.randrange(len(doc))
            return [*doc[:i], self.retype(doc[i]), *doc[i + 1 :]]
        return self.leaf()

    def request(self, req_id: int) -> dict[str, object]:
        call, args = self.choice(_HV_TEMPLATES)
        filled = {k: (self.domid if k == "domid" else v) for k, v in args.items()}
        return {"id": req_id, "call": call, "args": filled}

    def frame(self, req_id: int) -> tuple[bytes, bool]:
        roll = self.random()
        if roll < 0.35:
            body = msgpack.packb(self.request(req_id), use_bin_type=True)
        elif roll < 0.70:
            body = msgpack.packb(self.retype(self.request(req_id)), use_bin_type=True)
        elif roll < 0.85:
            flipped = bytearray(msgpack.packb(self.request(req_id), use_bin_type=True))
            for _ in range(self.randint(1, 3)):
                flipped[self.randrange(len(flipped))] ^= 1 << self.randrange(8)
            body = bytes(flipped)
        elif roll < 0.995:
            body = self.randbytes(self.randint(0, 48))
        else:
            length = self.choice((MAX_HV_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF))
            return struct.pack(">I", length) + b"\x80", True
        return struct.pack(">I", len(body)) + body, False


MAX_HV_FRAME: Final = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# qemu-model: QMP lines

_QMP_TEMPLATES: Final = (
    {"execute": "query-status"},
    {"execute": "query-status", "id": 1},
    {"execute": "x-physmap-info"},
    {"execute": "stop"},
    {"execute": "cont"},
    {"execute": "qmp_capabilities"},
    {"execute": "xen-save-devices-state", "arguments": {"filename": "", "live": False}},
    {"execute": "xen-load-devices-state", "arguments": {"filename": ""}},
    {"execute": "screendump", "arguments": {"filename": "", "format": "png"}},
    {"execute": "screendump", "arguments": {"filename": "", "format": "gif", "head": 1}},
    {"execute": "query-vnc"},
    {"execute": "no-such-command", "arguments": {"a": 1}},
    {"execute": "query-status", "arguments": {"unexpected": True}},
)


class QmpLineMaker(random.Random):
    """Random and mutated QMP lines.  Device-state files are only ever read or written inside
    ``scratch``; ``quit`` is never sent on purpose."""

    def __init__(self, seed: int, scratch: Path, *, max_nesting: int = 5000) -> None:
        super().__init__(seed)
        self.scratch = scratch
        self.max_nesting = max_nesting

    def command(self) -> dict[str, object]:
        cmd = dict(self.choice(_QMP_TEMPLATES))
        if "arguments" in cmd and isinstance(cmd["arguments"], dict):
            args = dict(cmd["arguments"])
            if "filename" in args:
                name = self.choice(("state", "garbage", "missing", "state"))
                args["filename"] = str(self.scratch / name)
            cmd["arguments"] = args
        return cmd

    def line(self) -> bytes:
        roll = self.random()
        if roll < 0.3:
            return json.dumps(self.command()).encode()
        if roll < 0.6:
            cmd = self.command()
            key = self.choice(("execute", "arguments", "id", "extra"))
            cmd[key] = self.choice(
                (None, 1, -1, 1.5e308, "", "x" * 300, [], {}, {"filename": 3}, True)
            )
            return json.dumps(cmd).encode()
        if roll < 0.85:
            text = bytearray(json.dumps(self.command()).encode())
            for _ in range(self.randint(1, 3)):
                i = self.randrange(len(text))
                text[i] = (
                    self.choice(b'{}[]":,\\\x00\xff\x80 0e')
                    if self.random() < 0.7
                    else (text[i] ^ (1 << self.randrange(7)))
                )
            out = bytes(text)
            return out if b"quit" not in out else b"{}"
        return self.choice(
            (
                b"",
                b"   ",
                b"[" * self.randint(1, self.max_nesting),
                b'{"execute":' + b'"' + self.randbytes(16).hex().encode() + b'"}',
                self.randbytes(self.randint(1, 80)).replace(b"\n", b" "),
                b'"just a string"',
                b"123",
                b"null",
            )
        )


# --------------------------------------------------------------------------------------------
# The toolstack: save images


class ImageMutator(random.Random):
    """Damage to a save image, aimed mostly at its structure: the headers at the front, the
    device state and END record at the back, and record headers found by their type words."""

    def mutate(self, data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(self.randint(1, 3)):
            roll = self.random()
            if roll < 0.4:
                i = self.randrange(min(len(buf), 256))
            elif roll < 0.8:
                i = max(0, len(buf) - 1 - self.randrange(min(len(buf), 8192)))
            else:
                i = self.randrange(len(buf))
            kind = self.randrange(5)
            if kind == 0:
                buf[i] ^= 1 << self.randrange(8)
            elif kind == 1:
                word = self.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, self.getrandbits(32)))
                buf[i : i + 4] = word.to_bytes(4, "little")
            elif kind == 2:
                del buf[i:]
            elif kind == 3:
                buf[i:i] = self.randbytes(self.randint(1, 16))
            else:
                del buf[i : i + self.randint(1, 64)]
            if not buf:
                buf = bytearray(b"\0")
        return bytes(buf)
