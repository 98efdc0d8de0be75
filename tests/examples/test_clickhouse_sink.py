"""The ClickHouse sink against a real ClickHouse server (Debian's 18.16 or newer)."""

from __future__ import annotations

import pytest

from chukcha.testing_clickhouse import ClickHouseError, ClickHouseServer
from examples.clickhouse_sink import (
    ClickHouseInsertError,
    ClickHouseSink,
    order_row,
    orders_table_ddl,
)


async def _totals(ch: ClickHouseServer, table: str, final: bool = True) -> tuple[int, int]:
    text = await ch.query(
        f"SELECT count(), sum(amount) FROM {table}{' FINAL' if final else ''} FORMAT TSV"  # noqa: S608
    )
    count, total = text.split()
    return int(count), int(total)


def _order(i: int, version: int = 0) -> dict[str, object]:
    return {"id": f"ev{i:05d}", "customer": f"c{i % 7}", "amount": i, "version": version}


async def test_replayed_rows_collapse_under_final(clickhouse: ClickHouseServer) -> None:
    rows = [order_row(_order(i)) for i in range(500)]
    async with ClickHouseSink(clickhouse.url, "orders", create_sql=orders_table_ddl("orders")) as s:
        await s.flush(rows)
        # A crash between flush and commit: the framework flushes the same rows again, and an
        # overlapping later batch too.
        await s.flush(rows)
        await s.flush(rows[250:] + [order_row(_order(i)) for i in range(500, 600)])
        assert s.stats.flushes == 3
        assert s.stats.rows == 500 + 500 + 350
    # Every copy really is in the table...
    assert (await _totals(clickhouse, "orders", final=False))[0] == 1350
    # ...and FINAL sees each event once, with exact sums.
    assert await _totals(clickhouse, "orders") == (600, sum(range(600)))
    # A merge makes the collapse physical.
    await clickhouse.query("OPTIMIZE TABLE orders FINAL")
    assert await _totals(clickhouse, "orders", final=False) == (600, sum(range(600)))


async def test_highest_version_wins(clickhouse: ClickHouseServer) -> None:
    async with ClickHouseSink(clickhouse.url, "orders", create_sql=orders_table_ddl("orders")) as s:
        await s.flush([order_row({**_order(1, version=2), "amount": 20})])
        await s.flush([order_row({**_order(1, version=1), "amount": 10})])  # late, older
        await s.flush([order_row({**_order(1, version=2), "amount": 20})])  # replay
    text = await clickhouse.query("SELECT id, version, amount FROM orders FINAL FORMAT TSV")
    assert text.split() == ["ev00001", "2", "20"]


async def test_bad_rows_fail_the_flush_and_insert_nothing(clickhouse: ClickHouseServer) -> None:
    async with ClickHouseSink(clickhouse.url, "orders", create_sql=orders_table_ddl("orders")) as s:
        await s.flush([order_row(_order(1))])
        good = order_row(_order(2))
        bad = {**order_row(_order(3)), "amount": "not a number"}
        with pytest.raises(ClickHouseInsertError) as info:
            await s.flush([good, bad])
        assert info.value.status >= 400
        assert s.stats.flushes == 1
    # The failed block was rejected as a whole: the good row of it is not there either.
    assert await _totals(clickhouse, "orders", final=False) == (1, 1)


async def test_missing_table_is_an_error_not_a_silent_drop(clickhouse: ClickHouseServer) -> None:
    async with ClickHouseSink(clickhouse.url, "nosuch") as s:
        with pytest.raises(ClickHouseInsertError):
            await s.flush([order_row(_order(1))])
        await s.flush([])  # nothing to send: no request at all
        assert s.stats.flushes == 0
    with pytest.raises(ClickHouseError):
        await clickhouse.query("SELECT count() FROM nosuch")


def test_bad_configuration_and_rows_are_rejected() -> None:
    with pytest.raises(ValueError, match="bad table name"):
        ClickHouseSink("http://127.0.0.1:1", "orders; DROP TABLE x")
    with pytest.raises(ValueError, match="bad table name"):
        orders_table_ddl("a-b")
    with pytest.raises(ValueError, match="timeout"):
        ClickHouseSink("http://127.0.0.1:1", "orders", timeout=0)
    with pytest.raises(ValueError, match="event id"):
        order_row({"customer": "c", "amount": 1})
    with pytest.raises(ValueError, match="amount"):
        order_row({"id": "e", "customer": "c", "amount": 1.5})
    with pytest.raises(ValueError, match="version"):
        order_row({"id": "e", "customer": "c", "amount": 1, "version": -1})
    assert order_row({"id": "e", "customer": "c", "amount": 3}) == {
        "id": "e", "version": 0, "customer": "c", "amount": 3,
    }


async def test_a_sink_that_was_never_started_still_works(clickhouse: ClickHouseServer) -> None:
    # `chukcha run` does not start sinks: each flush then uses a session of its own (nothing is
    # left open at exit) and the table is created before the first insert.
    sink = ClickHouseSink(clickhouse.url, "orders", create_sql=orders_table_ddl("orders"))
    await sink.flush([order_row(_order(1)), order_row(_order(2))])
    await sink.flush([order_row(_order(2))])
    assert await _totals(clickhouse, "orders") == (2, 3)
    assert sink.stats.flushes == 2
