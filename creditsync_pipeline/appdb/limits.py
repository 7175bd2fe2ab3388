"""Batch and chunk sizes of the app-database layer.

Read at call time (``limits.APPLY_BATCH_SIZE``, never copied into another module),
so a test can shrink them with ``monkeypatch.setattr(appdb.limits, ...)``.
"""

#: Rows per batch inside the single apply transaction.
APPLY_BATCH_SIZE = 50_000
#: Maximum number of ids bound into one ``IN (...)`` list.
READ_CHUNK_SIZE = 500
#: Ids per ``COPY ... WHERE instance_id = ANY(...)`` on PostgreSQL.
COPY_READ_CHUNK_SIZE = 100_000
#: Rows per executemany in the insert helpers.
INSERT_CHUNK_SIZE = 10_000
