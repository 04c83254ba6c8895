#!/usr/bin/env python3
"""A producer in Python: commits messages through troutbox's SQL producer function.

Each transaction writes a business row and adds one message with
`<schema>.<table>_add(key, value, headers)`; one in ten transactions is rolled back, and its
message never exists. Prints each committed message's value on its own line, after the
COMMIT. Stops after --count transactions, or at SIGTERM/SIGINT after the transaction in
progress.

    apt-get install python3-psycopg            # Debian; or: pip install psycopg
    DATABASE_URL="host=localhost dbname=app user=producer" \\
        python3 examples/sql_producer.py --count 100

The role needs USAGE on the schema, EXECUTE on the function, and whatever the business
table needs (docs/sql-producer.md, "Permissions"). `tests/relay_service_kafka.rs` runs this
program as one of its producers.
"""

import argparse
import os
import signal
import time

import psycopg

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--count", type=int, default=100, help="transactions to run")
parser.add_argument("--prefix", default="py", help="values are PREFIX-N")
parser.add_argument("--function", default="public.outbox_messages_add",
                    help="the outbox table's producer function")
parser.add_argument("--pace-ms", type=float, default=0, help="pause between transactions")
args = parser.parse_args()

stopping = False


def stop(*_):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)

with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS py_orders (id bigint, note text)")
    conn.commit()
    for n in range(args.count):
        if stopping:
            break
        value = f"{args.prefix}-{n}"
        with conn.transaction():
            conn.execute("INSERT INTO py_orders (id, note) VALUES (%s, %s)", (n, value))
            conn.execute(f"SELECT {args.function}(%s, %s, %s)",
                         (f"key-{n % 7}", value.encode(), ["content-type", "text/plain"]))
            if n % 10 == 9:
                raise psycopg.Rollback()  # leaves the block: the message never existed
        if n % 10 != 9:
            print(value, flush=True)  # only once committed
        if args.pace_ms:
            time.sleep(args.pace_ms / 1000)
