"""A source configured as Debian ships Orthanc (``HttpCompressionEnabled: true``): file
downloads come as stored, not gzipped, and a slow end of a transfer is named as such.

Orthanc gzips every answer to a client that accepts gzip; deflating DICOM files makes the
source the slow end of a replication, which the adaptive limiter must not blame on the
target. Each leg (the source's download, the target's store) is timed apart.
"""

from __future__ import annotations

import logging

import httpx
from faultkit import assert_converged, fast_fill, invoke, write_config

from migrator.engine.throttle import AdaptiveLimit
from migrator.testkit.dicomgen import make_dataset, upload_all
from migrator.testkit.faults import Fault
from migrator.testkit.proxy import Proxy

# Answers before the slow ones: enough for each leg to learn its usual latency.
HEALTHY_FIRST = 30
SLOW = 16
# Over the threshold of a slow leg (its usual latency, a few ms here, plus 1 s).
LATE_SECONDS = 2.0


class LateAnswers(Proxy):
    """A proxy in front of one Orthanc whose answers reach the client `seconds` late
    while it forwards the requests number `first` + 1 to `first` + `count` that match
    `method` and a path `prefix`.

    The answers, not the requests, are held: Orthanc closes a kept-alive connection idle
    for a second, so a request held longer would meet a closed connection, while a held
    answer is complete before the close that follows it.
    """

    def __init__(
        self, port: int, method: str, prefix: str, *, first: int, count: int, seconds: float
    ) -> None:
        super().__init__("127.0.0.1", port)
        self.match = (method, prefix)
        self.first, self.count, self.seconds = first, count, seconds
        self.seen = 0
        self.late = 0

    def _on_request(self, method: str, path: str) -> Fault | None:
        # Called on the proxy's loop thread, which alone touches the connections.
        fault = super()._on_request(method, path)
        if method == self.match[0] and path.startswith(self.match[1]):
            self.seen += 1
            late = self.first < self.seen <= self.first + self.count
            self.late += late
            for conn in self._conns:
                conn.u2c.delay = self.seconds if late else 0.0
        return fault


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the limiter alone -------------------------------------------------------------------


def test_adaptive_limit_blames_the_leg_that_slowed(caplog):
    caplog.set_level(logging.DEBUG, logger="migrator")
    clock = FakeClock()
    limit = AdaptiveLimit(8, clock=clock)
    for _ in range(20):
        limit.record(0.05, False, fetch=0.05)
    # The download leg slows down, the target answers as fast as ever.
    limit.record(0.05, False, fetch=3.0)
    assert limit.allowed == 6 and limit.cuts_by_side == {"source": 1, "target": 0}
    while limit.allowed < 8:
        limit.record(0.05, False, fetch=0.05)
    clock.now += 5
    limit.record(2.5, False, fetch=0.05)
    assert limit.allowed == 6 and limit.cuts_by_side == {"source": 1, "target": 1}
    clock.now += 5
    limit.record(None, True, "HTTP 503", side="source")
    assert limit.allowed == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "source slow (downloads slowed to 3.0 s): 6 concurrent transfers instead of 8" in (
        messages
    )
    assert "source keeps up again: back to 8 concurrent transfers" in messages
    assert "target struggling (answers slowed to 2.5 s): 6 concurrent transfers instead of 8" in (
        messages
    )
    assert "source struggling (HTTP 503): 3 concurrent transfers instead of 6" in messages
    assert len(messages) == 4, messages


def test_adaptive_limit_names_a_folder_read_as_such(caplog):
    caplog.set_level(logging.INFO, logger="migrator")
    limit = AdaptiveLimit(4, clock=FakeClock(), fetch_noun="reads")
    limit.record(0.01, False, fetch=0.01)
    limit.record(0.01, False, fetch=2.0)
    assert [r.getMessage() for r in caplog.records] == [
        "source slow (reads slowed to 2.0 s): 3 concurrent transfers instead of 4"
    ]


# -- against real Orthanc processes --------------------------------------------------------


def test_downloads_from_a_compressing_source_come_as_stored(
    orthanc_factory, ledger_path, ledger_url
):
    source = orthanc_factory("source", http_compression=True)
    target = orthanc_factory("target")
    # 128x128 images of 12-bit noise in 16-bit words: gzip takes ~14% off each file.
    data = make_dataset(20, seed=131, size=128)
    upload_all(source, data)
    total = sum(len(d.data) for d in data)
    # The source does gzip a file for a client that accepts gzip (what the client did).
    first = data[0]
    answer = httpx.get(
        f"{source.url}instances/{first.orthanc_id}/file", headers={"Accept-Encoding": "gzip"}
    )
    assert answer.headers.get("Content-Encoding") == "gzip"
    assert answer.num_bytes_downloaded < len(first.data) and answer.content == first.data
    with Proxy("127.0.0.1", source.http_port) as src:
        result = invoke("replicate", src.url, target.url, "--ledger", ledger_url)
        received = src.bytes_down
    assert result.code == 0, result.stderr
    # Every file crossed the wire as stored (gzipped, the bytes would be fewer).
    assert received >= total, (received, total)
    assert_converged(ledger_path, data, target)
    assert "per instance sent: source downloads" in result.stderr


def test_a_slow_source_is_named_not_the_target(orthanc_factory, tmp_path, ledger_path, ledger_url):
    source = orthanc_factory("source", http_compression=True)
    target = orthanc_factory("target")
    data = fast_fill(source, 80, seed=132)
    config = write_config(tmp_path / "quick.toml")
    # Only the downloads slow down (the listing's GET /instances?... does not match).
    late = dict(first=HEALTHY_FIRST, count=SLOW, seconds=LATE_SECONDS)
    with LateAnswers(source.http_port, "GET", "/instances/", **late) as src:
        result = invoke(
            "replicate", src.url, target.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config),
        )  # fmt: skip
        assert src.late == SLOW
    assert result.code == 0, result.stderr
    assert "source slow (downloads slowed to" in result.stderr, result.stderr
    # (A network error would be blamed on the end that raised it, rightly: only the
    # latency's attribution is checked.)
    assert "target struggling (answers slowed" not in result.stderr, result.stderr
    assert_converged(ledger_path, data, target)


def test_a_slow_target_is_named_not_the_source(orthanc_factory, tmp_path, ledger_path, ledger_url):
    source = orthanc_factory("source", http_compression=True)
    target = orthanc_factory("target")
    data = fast_fill(source, 80, seed=133)
    config = write_config(tmp_path / "quick.toml")
    late = dict(first=HEALTHY_FIRST, count=SLOW, seconds=LATE_SECONDS)
    with LateAnswers(target.http_port, "POST", "/instances", **late) as tgt:
        result = invoke(
            "replicate", source.url, tgt.url, "--ledger", ledger_url, "-c", "8",
            "--config", str(config),
        )  # fmt: skip
        assert tgt.late == SLOW
    assert result.code == 0, result.stderr
    assert "target struggling (answers slowed to" in result.stderr, result.stderr
    assert "source slow" not in result.stderr, result.stderr
    assert_converged(ledger_path, data, target)
