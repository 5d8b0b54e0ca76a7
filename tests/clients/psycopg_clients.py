"""Real Python drivers through gatehouse db, as Django uses them.

Run by tests/db.rs with PGHOST (the gatehouse socket directory), PGPORT,
PGUSER, PGPASSWORD and PGDATABASE set. Exits non-zero with a message on the
first failed expectation.
"""
import os
import threading
import time

import psycopg
import psycopg2
import psycopg2.extensions

DSN = ""  # libpq reads PG* from the environment


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def psycopg3_client_side_binding():
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS py_items")
        conn.execute("CREATE TABLE py_items (n int, label text)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO py_items (n, label) VALUES (%s, %s)",
                [(i, f"item {i}") for i in range(100)],
            )
            cur.execute("SELECT count(*), sum(n) FROM py_items")
            check(cur.fetchone() == (100, 4950), "executemany inserted 100 rows")


def psycopg3_server_side_binding():
    # At prepare_threshold psycopg 3 names its statements (Parse once, then
    # Bind by name). Eight clients share the pool's four server connections,
    # so each finds its statements prepared again on whichever connection it
    # gets. prepared_max = 3 with five statements makes psycopg deallocate
    # some as it goes.
    failures = []

    def client(k):
        try:
            with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
                conn.prepared_max = 3
                for i in range(60):
                    factor = i % 5 + 1
                    row = conn.execute(f"SELECT %s::int * {factor}", (k * 1000 + i,)).fetchone()
                    check(row == ((k * 1000 + i) * factor,), f"client {k}, execution {i}: {row}")
                with conn.transaction():
                    for i in range(5):
                        row = conn.execute("SELECT %s::int + 1", (i,)).fetchone()
                        check(row == (i + 1,), f"client {k}, in a transaction: {row}")
        except BaseException as e:  # SystemExit from check() too
            failures.append(f"client {k}: {e!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    check(not failures, "; ".join(failures))


def psycopg3_copy():
    with psycopg.connect(DSN, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY py_items (n, label) FROM STDIN") as copy:
                for i in range(100, 600):
                    copy.write_row((i, f"copied {i}"))
            cur.execute("SELECT count(*) FROM py_items")
            check(cur.fetchone()[0] == 600, "COPY FROM STDIN added 500 rows")
            out = bytearray()
            with cur.copy("COPY (SELECT n FROM py_items ORDER BY n) TO STDOUT") as copy:
                for block in copy:
                    out += block
            check(out.count(b"\n") == 600, "COPY TO STDOUT returned 600 rows")


def psycopg3_cancel_only_its_own_query():
    victim = psycopg.connect(DSN, autocommit=True)
    bystander = psycopg.connect(DSN, autocommit=True)
    results = {}

    def run(name, conn, seconds):
        started = time.monotonic()
        try:
            conn.execute(f"SELECT pg_sleep({seconds})")
            results[name] = ("done", time.monotonic() - started)
        except psycopg.errors.QueryCanceled:
            results[name] = ("cancelled", time.monotonic() - started)

    threads = [
        threading.Thread(target=run, args=("victim", victim, 20)),
        threading.Thread(target=run, args=("bystander", bystander, 2)),
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    victim.cancel()
    for t in threads:
        t.join(30)
    check(results.get("victim", ("?",))[0] == "cancelled", f"victim cancelled: {results}")
    check(results["victim"][1] < 10, f"cancel was prompt: {results}")
    check(results.get("bystander", ("?",))[0] == "done", f"bystander untouched: {results}")
    victim.close()
    bystander.close()


def psycopg2_simple_queries():
    conn = psycopg2.connect(DSN)
    conn.autocommit = False
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM py_items WHERE n < %s", (50,))
    check(cur.fetchone() == (50,), "psycopg2 query with a parameter")
    cur.execute("UPDATE py_items SET label = 'changed' WHERE n = 1")
    conn.rollback()
    cur.execute("SELECT label FROM py_items WHERE n = 1")
    check(cur.fetchone() == ("item 1",), "psycopg2 rollback")
    check(
        conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS,
        "psycopg2 opened a transaction",
    )
    conn.commit()
    conn.close()


if __name__ == "__main__":
    for step in (
        psycopg3_client_side_binding,
        psycopg3_server_side_binding,
        psycopg3_copy,
        psycopg3_cancel_only_its_own_query,
        psycopg2_simple_queries,
    ):
        step()
        print(f"ok {step.__name__}")
