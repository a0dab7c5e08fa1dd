"""The documented reply table (docs/replies.md) and relay/replies.py must say the same thing.

Every (code, enhanced code) a reply in `relay.replies` carries appears in the
table, every one the table names exists in `relay.replies`, and every row of the
table that is written out in full (no placeholder) is the exact text of a reply.
"""

from __future__ import annotations

import re
from pathlib import Path

from relay import replies
from relay.replies import Reply

DOCS = Path(__file__).resolve().parent.parent / "docs"
REPLY_TABLE = DOCS / "replies.md"
SETTINGS_TABLE = DOCS / "configuration.md"
# `421 4.4.2 Timeout, closing connection`: a reply written in a table cell.
_CELL_REPLY = re.compile(r"`(\d{3})(?: ([245x]\.[\dx]{1,3}\.[\dx]{1,3}))?([^`]*)`")
# Text that stands for something the reply fills in.
_PLACEHOLDER = re.compile(r"<[a-z-]+>|\.\.\.|\bN\b")


def table_rows() -> list[str]:
    lines = REPLY_TABLE.read_text().splitlines()
    start = lines.index("| reply | when |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return rows


def documented() -> list[tuple[str, str | None, str]]:
    return [
        (m.group(1), m.group(2), m.group(3).strip())
        for row in table_rows()
        for m in _CELL_REPLY.finditer(row)
    ]


def defined() -> dict[str, Reply]:
    return {name: v for name, v in vars(replies).items() if isinstance(v, Reply)}


def test_the_table_is_found_and_not_empty():
    assert len(table_rows()) > 20


def test_every_defined_reply_is_in_the_table():
    pairs = {(code, enhanced) for code, enhanced, _ in documented()}
    missing = sorted(
        f"{name} = {reply}"
        for name, reply in defined().items()
        if (str(reply.code), reply.enhanced) not in pairs
    )
    assert missing == []


def test_every_documented_code_is_defined():
    pairs = {(str(r.code), r.enhanced) for r in defined().values()}
    # Written without an enhanced code by definition (RFC 2034 section 3).
    bare = {"220", "334", "354"}
    stray = sorted(
        f"{code} {enhanced}"
        for code, enhanced, _ in documented()
        if (enhanced is None and code not in bare)
        or (enhanced is not None and "x" not in enhanced and (code, enhanced) not in pairs)
    )
    assert stray == []


def test_every_row_written_in_full_is_a_reply_the_server_sends():
    texts = {str(r) for r in defined().values()} | {replies.START_DATA}
    written = [
        f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
        for code, enhanced, text in documented()
        if enhanced is not None or code == "354"
    ]
    unknown = [
        line
        for line in written
        if not _PLACEHOLDER.search(line) and "x" not in line[:9] and line not in texts
    ]
    assert unknown == []


def test_every_setting_is_in_the_settings_table():
    from relay.config import KNOWN

    lines = SETTINGS_TABLE.read_text().splitlines()
    start = lines.index("| setting | default | meaning |")
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line.split("|")[1])
    documented = " ".join(table)
    missing = sorted(name for name in KNOWN if f"`{name}`" not in documented)
    assert missing == []
