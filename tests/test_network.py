"""Real networks on 127.0.0.1: HTTPS with a CA made here, client certificates, a forward proxy;
each configured through requests' environment variables and through config keys, for a
launched publisher and for publish_events; the proxy's credentials never shown."""

from __future__ import annotations

import json
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import forward_proxy
import pytest
import trustme
from conftest import wait_until
from procs import alive

from samsara_mp import InvalidConfiguration, PublishError, SamsaraClient
from samsara_mp.channel import Channel
from samsara_mp.config import Config
from samsara_mp.ingest import IngestServer

PROXY_PASSWORD = "px-S3CRET-4e2c"
_NETWORK_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "REQUESTS_CA_BUNDLE",
                      "CURL_CA_BUNDLE")


@pytest.fixture(autouse=True)
def _clean_network_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the variables it means: none inherited from the machine's environment."""
    for name in _NETWORK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _tls_server(ca: trustme.CA, require_client_cert: bool) -> IngestServer:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return IngestServer(store="memory", ssl_context=ctx)


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[IngestServer]:
    with _tls_server(ca, require_client_cert=False) as srv:
        yield srv


@pytest.fixture
def mtls_server(ca: trustme.CA) -> Iterator[IngestServer]:
    with _tls_server(ca, require_client_cert=True) as srv:
        yield srv


@pytest.fixture
def client_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("publisher@example.test")
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture
def proxy() -> Iterator[forward_proxy.ForwardProxy]:
    with forward_proxy.running("relay", PROXY_PASSWORD) as p:
        yield p


def _publish(url: str, runtime_dir: str, **settings: Any) -> bool:
    client = SamsaraClient(url=url, sourceId="s", runtime_dir=runtime_dir,
                           start_publishing_thread=False, send_client_stats=False, **settings)
    try:
        return client.publish_events([{"eventName": "direct", "n": i} for i in range(3)])
    finally:
        client.close(timeout=0.1)


def _through_launched_publisher(url: str, runtime_dir: str, channel: str, **settings: Any) -> str:
    """Record 10 events through a publisher this client launches, flush, stop it; its log."""
    client = SamsaraClient(url=url, sourceId="s", runtime_dir=runtime_dir, channel=channel,
                           publish_interval=50, min_buffer_size=1, backoff_base=10,
                           backoff_cap=100, send_client_stats=False, **settings)
    ch = Channel(client.config)
    pid = None
    try:
        for i in range(10):
            client.record_event(eventName="launched", n=i)
        assert client.flush(30), client.stats()
        pid = int(wait_until(ch.read_info, 10, "publisher.json")["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert PROXY_PASSWORD not in cmdline
        stats = client.stats()
        assert PROXY_PASSWORD not in json.dumps(stats)
        assert stats["channel"]["delivered"] == 10
    finally:
        client.close()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not alive(pid), 20, f"publisher {pid} to stop")
    log = (ch.dir / "publisher.log").read_text()
    assert PROXY_PASSWORD not in log
    return log


# ---- configuration ----

def test_the_environment_is_read_as_requests_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://tls-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp:8080")  # requests adds the http://
    assert Config.build(url="https://api.example").proxy == "http://tls-proxy:3128"
    assert Config.build(url="http://api.example").proxy == "http://proxy.corp:8080"
    assert Config.build(url="http://api.example", proxy="http://mine:1").proxy == "http://mine:1"
    monkeypatch.setenv("NO_PROXY", "api.example,.internal")
    assert Config.build(url="https://api.example").proxy is None
    assert Config.build(url="https://x.internal").proxy is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://any:1")
    assert Config.build(url="https://other.example").proxy == "http://any:1"
    # A publisher builds its config from the pipe alone (env={}): never from its own environment.
    assert Config.build(env={}, url="https://other.example").proxy is None


def test_a_ca_bundle_variable_applies_to_https_only(
    monkeypatch: pytest.MonkeyPatch, ca_file: str
) -> None:
    monkeypatch.setenv("CURL_CA_BUNDLE", ca_file)
    assert Config.build(url="https://api.example").ca_bundle == ca_file
    assert Config.build(url="http://api.example").ca_bundle is None
    assert Config.build(url="https://api.example", verify=False).ca_bundle is None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/ca.pem")
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(url="https://api.example")
    assert info.value.key == "ca_bundle" and "REQUESTS_CA_BUNDLE" in str(info.value)


@pytest.mark.parametrize(
    "settings, key, fragment",
    [
        ({"proxy": "ftp://proxy:21"}, "proxy", "not a proxy URL"),
        ({"proxy": f"http://u:{PROXY_PASSWORD}@host:notaport"}, "proxy", "does not parse"),
        ({"proxy": f"nohost-u:{PROXY_PASSWORD}"}, "proxy", "not a proxy URL"),
        ({"proxy": 5}, "proxy", "URL string"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "ca_bundle", "does not exist"),
        ({"client_cert": "/nonexistent/c.pem"}, "client_cert", "is not a file"),
        ({"client_key": "/etc/hostname"}, "client_key", "without client_cert"),
        ({"verify": "yes"}, "verify", "True or False"),
    ],
)
def test_bad_network_values_are_refused_naming_the_key(settings: dict[str, Any], key: str,
                                                       fragment: str) -> None:
    with pytest.raises(InvalidConfiguration) as info:
        Config.build(env={}, url="https://api.example", **settings)
    assert info.value.key == key and fragment in str(info.value)
    assert PROXY_PASSWORD not in str(info.value)


def test_proxy_credentials_are_redacted_where_a_config_is_shown() -> None:
    config = Config.build(env={}, url="http://api.example", proxy=f"http://u:{PROXY_PASSWORD}@p:1")
    assert PROXY_PASSWORD not in repr(config)
    assert Config.build(env={}, **config.to_dict()) == config  # what crosses the pipe


# ---- TLS ----

def test_publish_events_trusts_a_private_ca_from_the_key_or_the_environment(
    tls_server: IngestServer, runtime_dir: str, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_server.url.startswith("https://")
    # Not trusted: a TLS failure, the events not delivered.
    with pytest.raises(PublishError) as info:
        _publish(tls_server.url, runtime_dir)
    assert "SSL" in str(info.value) or "certificate" in str(info.value)
    assert _publish(tls_server.url, runtime_dir, ca_bundle=ca_file)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    assert _publish(tls_server.url, runtime_dir)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    assert _publish(tls_server.url, runtime_dir, verify=False)
    assert tls_server.event_count() == 9


def test_a_launched_publisher_trusts_the_ca_its_client_was_given(
    tls_server: IngestServer, runtime_dir: str, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _through_launched_publisher(tls_server.url, runtime_dir, "tls-key", ca_bundle=ca_file)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    _through_launched_publisher(tls_server.url, runtime_dir, "tls-env")
    assert tls_server.event_count() == 20


def test_verify_false_is_logged_at_every_publisher_start(
    tls_server: IngestServer, runtime_dir: str
) -> None:
    log = _through_launched_publisher(tls_server.url, runtime_dir, "noverify", verify=False)
    assert "verify=False" in log
    assert tls_server.event_count() == 10


def test_a_client_certificate_is_presented_when_the_api_requires_one(
    mtls_server: IngestServer, runtime_dir: str, ca_file: str, client_files: tuple[str, str]
) -> None:
    cert, key = client_files
    with pytest.raises(PublishError):
        _publish(mtls_server.url, runtime_dir, ca_bundle=ca_file)
    assert _publish(mtls_server.url, runtime_dir, ca_bundle=ca_file, client_cert=cert, client_key=key)
    _through_launched_publisher(mtls_server.url, runtime_dir, "mtls", ca_bundle=ca_file,
                                client_cert=cert, client_key=key)
    assert mtls_server.event_count() == 13


# ---- the proxy ----

def test_http_goes_through_the_proxy_from_the_environment_or_the_key(
    server: IngestServer, runtime_dir: str, proxy: forward_proxy.ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _publish(server.url, runtime_dir, proxy=proxy.url)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert _publish(server.url, runtime_dir)
    _through_launched_publisher(server.url, runtime_dir, "http-proxy-env")
    monkeypatch.delenv("HTTP_PROXY")
    _through_launched_publisher(server.url, runtime_dir, "http-proxy-key", proxy=proxy.url)
    assert server.event_count() == 26
    posts = [r for r in proxy.seen if r["method"] == "POST"]
    assert len(posts) >= 4 and all(r["target"].startswith(server.url) for r in posts)
    assert all(r["auth"] and r["auth"].startswith("Basic ") for r in posts)


def test_https_is_tunnelled_through_the_proxy_from_the_environment_or_the_key(
    tls_server: IngestServer, runtime_dir: str, ca_file: str, proxy: forward_proxy.ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _publish(tls_server.url, runtime_dir, ca_bundle=ca_file, proxy=proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)
    assert _publish(tls_server.url, runtime_dir)
    _through_launched_publisher(tls_server.url, runtime_dir, "tunnel-env")
    monkeypatch.delenv("HTTPS_PROXY")
    _through_launched_publisher(tls_server.url, runtime_dir, "tunnel-key", proxy=proxy.url)
    assert tls_server.event_count() == 26
    tunnels = [r for r in proxy.seen if r["method"] == "CONNECT"]
    assert len(tunnels) >= 4 and all(r["target"] == f"127.0.0.1:{tls_server.port}" for r in tunnels)


def test_no_proxy_sends_around_the_proxy(
    server: IngestServer, runtime_dir: str, proxy: forward_proxy.ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert _publish(server.url, runtime_dir)
    assert proxy.seen == []


def test_a_refusing_proxy_never_shows_its_credentials(
    tls_server: IngestServer, runtime_dir: str, ca_file: str, proxy: forward_proxy.ForwardProxy,
) -> None:
    wrong = proxy.bare_url.replace("http://", "http://relay:wrong-S3CRET-pass@")
    with pytest.raises(PublishError) as info:
        _publish(tls_server.url, runtime_dir, ca_bundle=ca_file, proxy=wrong)
    assert "wrong-S3CRET-pass" not in str(info.value)
    assert "407" in str(info.value) or "Proxy" in str(info.value)
    # Nothing listens at the proxy's address: urllib3's error names the proxy.
    with forward_proxy.running() as gone:
        dead = gone.bare_url
    with pytest.raises(PublishError) as info:
        _publish(tls_server.url, runtime_dir, ca_bundle=ca_file,
                 proxy=dead.replace("http://", f"http://relay:{PROXY_PASSWORD}@"))
    assert PROXY_PASSWORD not in str(info.value)
    assert tls_server.event_count() == 0
