"""Defaults for every setting, in one place. Times are seconds (floats).

Each setting is resolved as: command-line flag, then the ``MARTINET_*``
environment variable named beside it, then the default here.
"""

from __future__ import annotations

#: Address the server binds and clients/workers connect to (MARTINET_URL / MARTINET_BIND).
HOST = "127.0.0.1"
#: ROUTER port for client requests (MARTINET_CLIENT_PORT).
CLIENT_PORT = 8008
#: ROUTER port workers connect their DEALER to (MARTINET_WORKER_PORT).
WORKER_PORT = 8009
#: PULL port workers push status events to (MARTINET_STATUS_PORT).
STATUS_PORT = 18009
#: HTTP port of the dashboard, the JSON API and /metrics, on the bind address; 0 turns it off (MARTINET_HTTP_PORT).
HTTP_PORT = 8010
#: Database URL (MARTINET_DB).
DB_URL = "sqlite:///martinet.db"
#: How a commit is made durable before the server answers (MARTINET_DURABILITY): ``full`` (the default)
#: survives a crash of the operating system or a power loss; ``process``, an opt-in, only a crash of
#: Martinet (SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``): the last commits before
#: an OS crash may be lost.
DURABILITY = "full"
DURABILITIES = ("full", "process")
#: Tasks a worker runs at once (MARTINET_CONCURRENCY).
CONCURRENCY = 4
#: Tasks a worker holds in memory beyond those it runs, so a slot that frees up starts the next
#: one without a round trip to the server; None: automatic, about 50 ms of work per slot judged
#: by recent task durations, none for long tasks (MARTINET_PREFETCH).
PREFETCH: int | None = None
#: Seconds between heartbeats, in both directions (MARTINET_HEARTBEAT).
HEARTBEAT_INTERVAL = 1.0
#: Missed heartbeat intervals after which a peer is declared lost.
HEARTBEAT_LIVENESS = 5
#: Seconds running tasks get to finish after a worker's first SIGTERM/SIGINT (MARTINET_GRACE).
WORKER_GRACE = 30.0
#: Times a task whose handler fails is retried, unless the task says otherwise (MARTINET_DEFAULT_RETRIES).
DEFAULT_RETRIES = 0
#: Seconds before the first retry; each further retry waits twice as long (MARTINET_DEFAULT_RETRY_DELAY).
DEFAULT_RETRY_DELAY = 1.0
#: Seconds a handler may run before the worker stops it; None: no limit (MARTINET_DEFAULT_TIMEOUT).
DEFAULT_TIMEOUT: float | None = None
#: Priority of a task that does not give one; higher runs first.
DEFAULT_PRIORITY = 0
#: Longest wait before a retry, seconds: the cap of the exponential backoff (MARTINET_RETRY_DELAY_MAX).
RETRY_DELAY_MAX = 3600.0
#: Seconds a client waits for a reply before raising ServerUnavailable.
CLIENT_TIMEOUT = 10.0
#: Longest the scheduler sleeps without re-reading the store (guards clock jumps), seconds.
SCHEDULER_MAX_SLEEP = 60.0
#: On PostgreSQL, where several servers may share the database: longest the dispatcher and the
#: scheduler go without looking at the store, in case another server's wake-up (NOTIFY) was lost.
CLUSTER_POLL = 2.0
#: Deliveries lost with their worker (it died or went silent) after which a task fails
#: instead of being delivered again: a task that kills its worker must not do so forever (MARTINET_MAX_DELIVERIES).
MAX_DELIVERIES = 10
#: Largest message accepted on any socket, bytes (MARTINET_MAX_MESSAGE_BYTES).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Default and maximum row counts for ``list``.
LIST_LIMIT = 50
LIST_LIMIT_MAX = 10_000
#: Default and maximum tasks one ``bulk`` request cancels or retries (in one transaction).
BULK_LIMIT = 1_000
BULK_LIMIT_MAX = 10_000
#: Largest JSON result a handler may return, bytes; a larger one fails the task (keep it well
#: under MAX_MESSAGE_BYTES: results travel to the server in status messages).
MAX_RESULT_BYTES = 4 * 1024 * 1024
#: Longest text a handler's failure or progress may carry, in characters; longer text is clipped
#: (by the worker, and again by the server) with a marker saying how much was cut (docs/PROTOCOL.md).
MAX_ERROR_CHARS = 8_192
MAX_TRACEBACK_CHARS = 65_536
MAX_PROGRESS_CHARS = 1_024
#: Longest name, username and worker id, in characters (VARCHAR(255) columns).
MAX_NAME_CHARS = 255
#: Deepest nesting of arrays and objects in a task's args or result: deeper values are refused,
#: since every JSON encoder and decoder on the way recurses once per level.
MAX_JSON_DEPTH = 100
#: Largest integer id or attempt number a peer may send (SQLite's and PostgreSQL's BIGINT).
MAX_ID = 2**63 - 1
#: Most tasks one ``execute_many`` request may submit.
SUBMIT_MANY_MAX = 10_000
#: Most dependencies one task may have (``after``): their results travel with it to its worker.
AFTER_MAX = 100
#: Most steps one ``chain`` request may submit.
CHAIN_MAX = 1_000
#: Most status events or queued tasks handled in one loop turn (one transaction).
BATCH_MAX = 500
#: Finished tasks are deleted this long after they finished, seconds: succeeded ones
#: (MARTINET_KEEP_SUCCEEDED), failed and cancelled ones (MARTINET_KEEP_FAILED); None keeps them.
KEEP_SUCCEEDED: float | None = 7 * 86400.0
KEEP_FAILED: float | None = 30 * 86400.0
#: Most tasks one purge deletes in one transaction (a ``purge`` request, or a retention batch): on SQLite
#: each batch holds the hub, so it bounds what a submit waits meanwhile (bench/drive.py purge, 1,000,000
#: tasks: submit p99 5.9 ms at 100, 8.4 at 200, 17.6 at 500; the purge takes 28, 18 and 12 s).
PURGE_BATCH = 100
PURGE_BATCH_MAX = 10_000
#: Longest the server waits between two retention passes, seconds.
RETENTION_INTERVAL = 60.0
