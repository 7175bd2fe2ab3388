"""The full read of ``instances`` as CSV pages the server formats (``GROUP_CONCAT``).

No Python object per row: each page is one UTF-8 string of CSV lines, parsed by pandas'
C reader. Pages are primary-key ranges sized to stay under ``max_allowed_packet``; a
page the server cuts short is read again in halves (see the package's docstring).
"""

from __future__ import annotations

import io

import pandas as pd
from sqlalchemy import Connection

from ... import frames

_TIMESTAMPS = frames.EPOCH_TIMESTAMPS
#: First page of the full read; later pages are sized from the bytes per row seen.
FIRST_PAGE_ROWS = 20_000
MAX_PAGE_ROWS = 500_000


def _csv_text(column: str) -> str:
    return f"""'"', REPLACE({column}, '"', '""'), '"'"""


def _epoch_micros(column: str) -> str:
    return f"IFNULL(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {column}), '')"


#: One instance as a CSV line: "id","plan",total,used,created_us,updated_us.
_CSV_ROW = (
    "CONCAT("
    + ", ',', ".join([
        _csv_text("instance_id"),
        _csv_text("plan_id"),
        "credits_total",
        "credits_used",
        *(_epoch_micros(name) for name in _TIMESTAMPS),
    ])
    + ")"
)


class PagedReader:
    """Reads ``instances`` as CSV pages (``GROUP_CONCAT``) inside one consistent snapshot."""

    def __init__(self, conn: Connection, *, ordered: bool) -> None:
        self.dbapi = conn.connection.dbapi_connection
        self.cursor = self.dbapi.cursor()
        self.ordered = ordered
        self.pages: list[bytes] = []
        self.rows = 0
        # A page is one string no longer than max_allowed_packet (the server's limit on any
        # value it sends); GROUP_CONCAT stops there and warns, which sends the page back in halves.
        self.cursor.execute("SELECT @@SESSION.max_allowed_packet")
        (packet,) = self.cursor.fetchone()
        self.budget = max(4096, int(packet) - 4096)
        self.cursor.execute(f"SET SESSION group_concat_max_len = {self.budget}")
        self.cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        self.page_rows = FIRST_PAGE_ROWS

    def _literal(self, value: str) -> str:
        return self.dbapi.escape(value)

    def _page(self, where: str) -> tuple[int, bytes | None] | None:
        """``(rows, csv)`` of the rows matching ``where``; None when the server cut the text.

        The text comes as UTF-8 bytes (``CAST ... AS BINARY``): no decoding into a Python
        str (4 bytes a character for a page with one emoji) before pandas reads it.
        """
        order = " ORDER BY instance_id" if self.ordered else ""
        self.cursor.execute(
            # A real line feed between the quotes: backslash-n is two characters under NO_BACKSLASH_ESCAPES.
            f"SELECT COUNT(*), CAST(GROUP_CONCAT({_CSV_ROW}{order} SEPARATOR '\n') AS BINARY) "
            f"FROM instances WHERE {where}"
        )
        count, text = self.cursor.fetchone()
        if self.cursor.warning_count:
            return None
        return int(count), text

    def _keep(self, count: int, text: bytes | None) -> None:
        if count and text is not None:
            self.pages.append(text)
            self.rows += count
            per_row = max(1, len(text) // count)
            self.page_rows = max(1, min(MAX_PAGE_ROWS, self.budget // 2 // per_row))

    def read_all(self) -> None:
        """Every row, in primary-key ranges of ``page_rows``."""
        low: str | None = None
        while True:
            after = "" if low is None else f" WHERE instance_id > {self._literal(low)}"
            self.cursor.execute(
                f"SELECT instance_id FROM instances{after} ORDER BY instance_id LIMIT 1 OFFSET {self.page_rows - 1}"
            )
            found = self.cursor.fetchone()
            high = None if found is None else found[0]
            conditions = [] if low is None else [f"instance_id > {self._literal(low)}"]
            if high is not None:
                conditions.append(f"instance_id <= {self._literal(high)}")
            page = self._page(" AND ".join(conditions) or "TRUE")
            if page is None:  # cut short: the same range in smaller pages
                if self.page_rows == 1:
                    raise RuntimeError("one instance row is longer than max_allowed_packet")
                self.page_rows = max(1, self.page_rows // 2)
                continue
            self._keep(*page)
            if high is None:
                return
            low = high

    def read_ids(self, ids: list[str]) -> None:
        """The named rows (an ``IN`` list), halved until each page fits."""
        page = self._page(f"instance_id IN ({', '.join(map(self._literal, ids))})")
        if page is not None:
            self._keep(*page)
            return
        if len(ids) == 1:
            raise RuntimeError("one instance row is longer than max_allowed_packet")
        half = len(ids) // 2
        self.read_ids(ids[:half])
        self.read_ids(ids[half:])

    def frame(self) -> pd.DataFrame | None:
        """The parsed frame (None when a row could not be rendered: the caller reads it portably)."""
        self.cursor.close()
        if not self.rows:
            return frames.frame([], frames.INSTANCE_SPEC)
        body = io.BytesIO(b"\n".join(self.pages))
        self.pages = []
        frame = frames.instances_from_csv(body)
        body.close()
        if len(frame) != self.rows:  # a NULL id or plan makes CONCAT NULL: GROUP_CONCAT skips the row
            return None
        return frame
