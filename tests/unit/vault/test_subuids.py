"""Which user a subordinate uid counts as (the daemon's per-user caps)."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from vault.app.daemon import SubordinateUids


def test_a_subordinate_uid_counts_as_the_owner_of_its_range(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    f = tmp_path / "subuid"
    f.write_text(
        "# comment\n"
        "nobody:100000:65536\n"
        "4242:200000:10\n"  # a numeric owner
        "no-such-user-x:300000:5\n"  # an owner with no passwd entry: a user of its own
        "bad line\n"
        "nobody:abc:5\n"
        "nobody:400000:0\n"  # an empty range
        "4243:100010:100\n"  # overlaps nobody's: the earlier range keeps the overlap
    )
    ids = SubordinateUids(str(f))
    ids.reload()
    assert ids.owner(100000) == nobody and ids.owner(165535) == nobody
    assert ids.owner(165536) == 165536  # past the range: itself
    assert ids.owner(99999) == 99999
    assert ids.owner(200009) == 4242 and ids.owner(200010) == 200010
    assert ids.owner(300004) == 300000
    assert ids.owner(400000) == 400000
    assert ids.owner(100050) == nobody
    assert ids.owner(0) == 0

    # as shadow reads the fields (strtoul, base 0): what newuidmap grants
    f.write_text(
        "nobody:0x30d400:0x10\n"  # hex: 3200000, 16
        "nobody: 014152000:010\n"  # a leading blank; octal: 3200000 + 64 ... overlap kept
        "nobody:03300000:8\n"  # octal 03300000 = 884736
        "nobody:3400000:6\u00b2\n"  # not a number to strtoul: skipped, nothing raised
        "bad\x00name:3500000:5\n"  # not a name: a user of its own
        "ghost-user:3600000:10\n"
        "nobody:-5:10\n"
    )
    ids.reload()
    assert ids.owner(3200000) == nobody and ids.owner(3200015) == nobody
    assert ids.owner(884736) == nobody and ids.owner(884744) == 884744
    assert ids.owner(3400000) == 3400000
    assert ids.owner(3500004) == 3500000
    assert ids.in_range(3600000) and ids.owner(3600000) == 3600000  # its own start, yet in a range
    assert not ids.in_range(3700000)

    # as shadow reads the lines: three fields and anything after them, newlines
    # only, lines under 1,023 bytes
    f.write_text(
        "nobody:4000000:10:\n"
        "nobody:4100000:10:a note\n"
        "nobody:4200000:10\r\n"  # the count is '10\\r': no number to strtoul
        "nobody:4300000:10" + " " * 1100 + "\n"
    )
    ids.reload()
    assert ids.owner(4000009) == nobody and ids.owner(4100009) == nobody
    assert ids.owner(4200000) == 4200000 and ids.owner(4300000) == 4300000
    assert ids.problems == []

    f.write_text("nobody:5000000:100\n4242:5000050:100\n")  # two owners overlap
    ids.reload()
    assert ids.owner(5000060) == nobody and ids.owner(5000120) == 4242
    assert ids.problems and "5000050-5000099" in ids.problems[0], ids.problems

    f.write_text("nobody:500000:10\n")  # read again when it changes
    ids.reload()
    assert ids.owner(100000) == 100000 and ids.owner(500001) == nobody
    os.unlink(f)  # gone: no ranges
    ids.reload()
    assert ids.owner(500001) == 500001
    f.mkdir()  # there, and unreadable: said, and the ranges read before are kept
    ids.reload()
    assert ids.error and str(f) in ids.error
