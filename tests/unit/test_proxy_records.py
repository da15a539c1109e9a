"""Record sinks: JSON lines to a file and to a UNIX socket (bounded while it is away)."""

from __future__ import annotations

import asyncio
import json

from pilus.proxy import records
from pilus.proxy.records import CountingSink, JsonLinesFileSink, UnixSocketSink, open_sink


def test_file_sink_appends_json_lines(tmp_path):
    sink = JsonLinesFileSink(tmp_path / "r.jsonl")
    sink.emit({"method": "GET", "status": 200})
    sink.emit({"method": "PUT", "status": 403})
    asyncio.run(sink.aclose())
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(x)["status"] for x in lines] == [200, 403]


def test_open_sink_forms(tmp_path):
    assert isinstance(open_sink(None), CountingSink)
    assert isinstance(open_sink(f"unix:{tmp_path}/s"), UnixSocketSink)
    sink = open_sink(f"file:{tmp_path}/f.jsonl")
    assert isinstance(sink, JsonLinesFileSink)
    asyncio.run(sink.aclose())


def test_unix_sink_delivers_after_the_reader_appears_and_drops_the_oldest(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_PENDING_RECORDS", 3)
    path = tmp_path / "records.sock"

    async def run() -> list[dict]:
        sink = UnixSocketSink(path)
        for i in range(5):  # nobody listens yet: only the last 3 wait
            sink.emit({"n": i})
        got: list[dict] = []
        done = asyncio.Event()

        async def reader(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while line := await r.readline():
                got.append(json.loads(line))
                if len(got) == 3:
                    done.set()
            w.close()

        server = await asyncio.start_unix_server(reader, path=str(path))
        sink.emit({"n": 5})
        await asyncio.wait_for(done.wait(), 5)
        server.close()
        await sink.aclose()
        assert sink.dropped == 3
        return got

    assert [r["n"] for r in asyncio.run(run())] == [3, 4, 5]  # 0, 1, 2 dropped while nobody listened
