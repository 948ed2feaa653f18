#!/usr/bin/env python3
"""The peer of the processor benchmark: what a team would write instead of HELIOS.

A batched Kafka processor in Python (confluent-kafka, redis-py, psycopg 3), doing the same job
on the same backlog as `helios process` in `bash scripts/bench.sh process`:
- consume the four raw topics (batches of --batch records, offsets committed by hand after the
  batch, at least once);
- normalize each cloud's envelope (EventBridge, Pub/Sub push, Event Grid array, direct JSON)
  into (source, event_id, event_type, occurred_at, data);
- reject events without order_id/customer_id to the DLQ topic;
- dedup with one pipelined `SET NX PX` per event in Redis (the same command as HELIOS; 15 min
  here, as the benchmark's own marks);
- store into the same `events` table (same indexes, the scratch schema HELIOS migrated) with
  one `INSERT ... ON CONFLICT DO NOTHING` run by `executemany` (psycopg 3 pipelines it);
- fan out every stored event (JSON, key = order id) to `<prefix>events.<Type>`, acks=all, and
  wait for every acknowledgement before committing.

It prints one JSON line: {"records": N, "seconds": s, "cpu_seconds": c, "peak_rss_mib": m,
"stored": k, "duplicates": d, "dlq": q}.
"""

import argparse
import base64
import json
import sys
import time

import psycopg
import redis
from confluent_kafka import Consumer, KafkaException, Producer


def normalize(source, value):
    """(event_id, event_type, occurred_at, data) per event of one raw record."""
    body = json.loads(value)
    if source == "aws":
        return [(body["id"], body["detail-type"], body["time"], body["detail"])]
    if source == "gcp":
        m = body["message"]
        data = json.loads(base64.b64decode(m["data"]))
        etype = m.get("attributes", {}).get("eventType", "Unknown")
        return [(m["messageId"], etype, m["publishTime"], data)]
    if source == "azure":
        out = []
        for e in body:
            etype = e["eventType"].rsplit(".", 1)[-1]
            out.append((e["id"], etype, e["eventTime"], e["data"]))
        return out
    return [(body["event_id"], body["event_type"], None, body["data"])]


def peak_rss_mib():
    """VmHWM: this process's peak resident memory (ru_maxrss would carry the forking parent's
    across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def field(data, snake, camel):
    v = data.get(snake)
    return v if v is not None else data.get(camel)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--bootstrap", required=True)
    a.add_argument("--raw-topics", required=True, help="comma-separated")
    a.add_argument("--dlq-topic", required=True)
    a.add_argument("--event-topic-prefix", required=True, help="the fan-out topic is this + type")
    a.add_argument("--group", required=True)
    a.add_argument("--database-url", required=True)
    a.add_argument("--schema", required=True)
    a.add_argument("--redis-url", required=True)
    a.add_argument("--redis-prefix", required=True)
    a.add_argument("--records", type=int, required=True)
    a.add_argument("--batch", type=int, default=2000)
    # 15 minutes, as the benchmark's own dedup marks: a run's millions of keys must not outlive
    # it by a day in the Redis the test suite shares (its KEYS scans slowed past their timeout).
    a.add_argument("--mark-ttl-ms", type=int, default=900_000)
    args = a.parse_args()

    topics = args.raw_topics.split(",")
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "queued.max.messages.kbytes": 16384,
    })
    consumer.subscribe(topics)
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
    })
    r = redis.Redis.from_url(args.redis_url)
    pg = psycopg.connect(args.database_url, autocommit=False)
    pg.execute(f'SET search_path TO "{args.schema}"')
    pg.commit()
    insert = (
        "INSERT INTO events (source, event_id, event_type, occurred_at, ingested_at, data,"
        " raw_topic, raw_partition, raw_offset, raw_index)"
        " VALUES (%s, %s, %s, coalesce(%s::timestamptz, now()), now(), %s::jsonb, %s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING"
    )
    failed = []

    def delivered(err, _msg):
        if err is not None:
            failed.append(err)

    seen = stored = dups = dlq = 0
    started = time.monotonic()
    cpu0 = time.process_time()
    while seen < args.records:
        msgs = consumer.consume(num_messages=args.batch, timeout=1.0)
        if not msgs:
            if time.monotonic() - started > 600:
                sys.exit(f"peer stalled at {seen}/{args.records}")
            continue
        events = []
        for m in msgs:
            if m.error():
                raise KafkaException(m.error())
            source = dict(m.headers() or []).get("helios-source", b"direct").decode()
            try:
                evs = normalize(source, m.value())
            except (ValueError, KeyError, TypeError):
                producer.produce(args.dlq_topic, m.value(), on_delivery=delivered)
                dlq += 1
                continue
            for idx, (eid, etype, at, data) in enumerate(evs):
                if field(data, "order_id", "orderId") is None or field(data, "customer_id", "customerId") is None:
                    producer.produce(args.dlq_topic, m.value(), on_delivery=delivered)
                    dlq += 1
                    continue
                events.append((source, eid, etype, at, data, m.topic(), m.partition(), m.offset(), idx))
        pipe = r.pipeline(transaction=False)
        for e in events:
            pipe.set(f"{args.redis_prefix}{e[0]}:{e[1]}", "1", nx=True, px=args.mark_ttl_ms)
        fresh = [e for e, won in zip(events, pipe.execute()) if won]
        dups += len(events) - len(fresh)
        with pg.cursor() as cur:
            cur.executemany(insert, [
                (s, eid, et, at, json.dumps(d), t, p, o, i) for (s, eid, et, at, d, t, p, o, i) in fresh
            ])
        pg.commit()
        for (s, eid, et, at, d, *_rest) in fresh:
            producer.produce(
                args.event_topic_prefix + et,
                json.dumps({"source": s, "event_id": eid, "event_type": et, "occurred_at": at, "data": d}),
                key=str(field(d, "order_id", "orderId")),
                on_delivery=delivered,
            )
        producer.flush()
        if failed:
            sys.exit(f"fan-out failed: {failed[0]}")
        consumer.commit(asynchronous=False)
        stored += len(fresh)
        seen += len(msgs)
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu0
    consumer.close()
    print(json.dumps({
        "records": seen, "seconds": elapsed, "cpu_seconds": cpu,
        "peak_rss_mib": peak_rss_mib(),
        "stored": stored, "duplicates": dups, "dlq": dlq,
    }))


if __name__ == "__main__":
    main()
