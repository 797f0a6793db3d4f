"""Reference Samsara Ingestion API server, for local runs, tests and benchmarks.

It stands where the real Ingestion API stands in the data flow of docs/design.md: the
publisher's ``POST {url}/v1/events`` lands here. It answers as the real API
does (202 / positional 400 / 404 / api-status) and adds test controls (fault
injection, stats, the accepted events) on a separate admin listener.
"""

from samsara_mp.ingest.server import (
    STORES,
    FaultRule,
    IngestServer,
    RequestRecord,
    validate_events,
)

__all__ = ["STORES", "FaultRule", "IngestServer", "RequestRecord", "validate_events"]
