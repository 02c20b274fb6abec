"""A harness of real processes for the soak benchmark and the fault tests: routers and heads run as
``python -m router_worker.cli`` children (``procs``), a Redis server that can be stopped and started with its
data, and a ledger of what came out of the results topic and the DLQ (``ledger``). It lives in the package so
``router-worker bench soak`` can use it; ``tests/procs.py`` imports it from here."""
