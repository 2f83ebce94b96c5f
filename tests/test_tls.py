"""HTTPS targets: a real Orthanc behind a TLS-terminating proxy with a self-signed
certificate (as behind nginx; Debian's Orthanc 1.10.1 crashes on HTTPS requests with its
own SslEnabled), trusted through `ca_file` (config or environment), refused in one line
without it."""

from __future__ import annotations

from pathlib import Path

from conftest import self_signed
from faultkit import invoke, write_files

from migrator.testkit.fastgen import fast_dataset
from migrator.testkit.orthanc import OrthancProcess
from migrator.testkit.proxy import Proxy


def _tls_proxy(orthanc_factory, tmp_path: Path) -> tuple[OrthancProcess, Proxy, Path]:
    """A target Orthanc, an HTTPS proxy in front of it, and the certificate to trust."""
    target = orthanc_factory("target")
    cert, tls = self_signed(tmp_path)
    return target, Proxy("127.0.0.1", target.http_port, tls=tls), cert


def _folder(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    data = fast_dataset(n, seed=51)
    write_files(tmp_path / "files", data)
    return tmp_path / "files", sorted(d.orthanc_id for d in data)


def test_import_into_an_https_target_trusted_through_ca_file(orthanc_factory, tmp_path, ledger_url):
    target, proxy, cert = _tls_proxy(orthanc_factory, tmp_path)
    folder, expected = _folder(tmp_path, 12)
    with proxy:
        assert proxy.url.startswith("https://")
        env = {"MIGRATOR_TARGET_CA_FILE": str(cert)}
        result = invoke("import", str(folder), proxy.url, "--ledger", ledger_url, env=env)
        assert result.code == 0, result.stderr
        # The same through the config file (a second run: everything is already sent).
        config = tmp_path / "c.toml"
        config.write_text(f'[target]\nca_file = "{cert}"\n')
        again = invoke(
            "import", str(folder), proxy.url, "--ledger", ledger_url, "--config", str(config)
        )
        assert again.code == 0, again.stderr
    assert sorted(target.instance_ids()) == expected


def test_an_untrusted_certificate_stops_the_run_before_the_ledger(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    target, proxy, _ = _tls_proxy(orthanc_factory, tmp_path)
    folder, _ = _folder(tmp_path, 3)
    with proxy:
        result = invoke("import", str(folder), proxy.url, "--ledger", ledger_url)
    assert target.count() == 0
    assert result.code == 3
    result.assert_one_line_error()
    assert "TLS certificate is not trusted" in result.stderr and "ca_file" in result.stderr
    assert not ledger_path.exists()


def test_a_ca_file_that_cannot_be_read_is_a_usage_error(
    orthanc_factory, tmp_path, ledger_path, ledger_url
):
    target, proxy, _ = _tls_proxy(orthanc_factory, tmp_path)
    folder, _ = _folder(tmp_path, 3)
    with proxy:
        for bad in (tmp_path / "missing.pem", folder):
            env = {"MIGRATOR_TARGET_CA_FILE": str(bad)}
            result = invoke("import", str(folder), proxy.url, "--ledger", ledger_url, env=env)
            assert result.code == 2, result.stderr
            result.assert_one_line_error()
            assert f"target ca_file {bad}: cannot be used" in result.stderr
    assert not ledger_path.exists() and target.count() == 0
