"""The optional Prometheus endpoint: upload outcomes, bytes, failures by code, queue length and journal size."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class MetricsError(Exception):
    """The metrics endpoint could not be started; the message names the address."""


class Metrics:
    """The agent's metrics, in a registry of their own (no process or platform collectors)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.uploads = Counter("s3watch_uploads", "Uploads finished, by outcome (uploaded, already_present, duplicate, gone, unmatched).",
                               ["outcome"], registry=self.registry)
        self.uploaded_bytes = Counter("s3watch_uploaded_bytes", "Bytes sent to the bucket by finished uploads.", registry=self.registry)
        self.failures = Counter("s3watch_upload_failures", "Failed upload attempts, by status code (failed_code_0 is an unreachable endpoint).",
                                ["code"], registry=self.registry)
        self.queue_length = Gauge("s3watch_queue_length", "Uploads pending, including those waiting for their images row.", registry=self.registry)
        self.oldest_pending_age = Gauge("s3watch_oldest_pending_age_seconds", "Age of the oldest pending upload, 0 when none is pending.",
                                        registry=self.registry)
        self.last_success = Gauge("s3watch_last_success_timestamp_seconds", "Unix time of the last successful upload, 0 before the first.",
                                  registry=self.registry)
        self.journal_bytes = Gauge("s3watch_journal_bytes", "Size of the journal file in bytes.", registry=self.registry)
        self._server: Any = None

    def serve(self, listen: str) -> None:
        """Start the HTTP endpoint on `listen` (HOST:PORT) in a thread of its own. Raises MetricsError."""
        host, _, port = listen.rpartition(":")
        try:
            self._server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as error:
            raise MetricsError(f"metrics endpoint {listen} could not be opened ({error.strerror}): choose a free address in metrics.listen") from None

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
