"""The servers' key and address checks (docs/reliability.md, "Security"): a key no client could send is
refused at start; the guard compares the header's bytes with the key's UTF-8 (a non-ASCII key given
programmatically works, on a real server); and `localhost` that a resolver maps off loopback is refused
without a key, after binding, from the address actually bound (a real /etc/hosts in a mount namespace)."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import learnable_pairs, write_jsonl
from prefalign.errors import ConfigError

KEY = "schlüssel-ключ-鍵"


def _get(port: int, path: str, auth: bytes | None) -> int:
    """A GET whose Authorization header is these raw bytes (http.client sends bytes as they are)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path)
        if auth is not None:
            conn.putheader("Authorization", auth)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_non_ascii_key_given_programmatically_lets_its_holder_in(tmp_path):
    """A real review server (uvicorn on loopback) guarded by a non-ASCII key: the key's UTF-8 gets in,
    a wrong key, a missing one and the key's latin-1 bytes do not."""
    import uvicorn

    from prefalign.review.server import guarded
    from prefalign.review.store import Store
    from prefalign.runtime.http import listen

    store = Store(tmp_path / "labels.sqlite")
    sock = listen("127.0.0.1", 0, KEY)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(guarded(store, KEY), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        assert _get(port, "/health", None) == 200
        answers = [_get(port, "/api/summary", auth) for auth in (
            b"Bearer " + KEY.encode("utf-8"), b"Bearer wrong", None, b"Bearer " + KEY.encode("utf-8")[:-1],
            b"Bearer " + "schlüssel".encode("latin-1"))]
        assert answers[0] != 401 and answers[1:] == [401] * 4, answers
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_key_no_client_could_send_is_refused_at_start(monkeypatch, capsys):
    from prefalign.review.server import check_host as review
    from prefalign.serve.host import check_host as serve

    for check in (review, serve):
        for key in (KEY, "café", " padded", "padded ", "tab\tkey", "line\nbreak"):
            with pytest.raises(ConfigError, match="printable ASCII"):
                check("127.0.0.1", key)
        for key in ("s3cret", "with inner space", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~", None, ""):
            check("0.0.0.0" if key else "127.0.0.1", key)
    from prefalign.cli import main

    monkeypatch.setattr(sys, "argv", ["prefalign", "serve", "m", "--api-key", KEY])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "printable ASCII" in err and "Traceback" not in err, err


def _exposed_address() -> str | None:
    """This machine's own address that is not loopback (bindable here), if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def _in_namespace_with_hosts(hosts: str, argv: list[str], tmp_path: Path,
                             env: dict | None = None) -> subprocess.CompletedProcess:
    """argv run with /etc/hosts replaced by `hosts`, in a mount namespace of its own (the host's file untouched)."""
    fake = tmp_path / "hosts"
    fake.write_text(hosts)
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(fake), *argv], capture_output=True, text=True,
                          timeout=60, env=env)


def _can_mount(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    return _in_namespace_with_hosts("", ["true"], tmp_path).returncode == 0


# both commands in one interpreter (its start-up paid once): each one's exit code and error line
_BOTH = """
import sys
from prefalign.cli import main
for argv in (sys.argv[1:4], sys.argv[4:]):
    sys.argv = ["prefalign", *argv, "--host", "localhost", "--port", "0"]
    try:
        main()
    except SystemExit as e:
        print("exit", argv[0], e.code, file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount namespaces: Linux")
def test_localhost_mapped_off_loopback_is_refused_without_a_key(tmp_path):
    """`--host localhost` is loopback by name; a resolver that maps it to this machine's exposed address
    must not get a server without a key there: both commands check the address they bound, and refuse
    (serve before torch and the models load)."""
    address = _exposed_address()
    if address is None or not _can_mount(tmp_path):
        pytest.skip("needs a non-loopback address and unshare -m with mount (root)")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(2))
    env = {**os.environ, "PREFALIGN_API_KEY": "", "PREFALIGN_REVIEW_KEY": ""}
    argv = [sys.executable, "-c", _BOTH, "serve", "no-model-needed", "--max-batch=1",
            "review", "--pairs", str(pairs), "-o", str(tmp_path / "labels.sqlite")]
    run = _in_namespace_with_hosts(f"{address} localhost\n", argv, tmp_path, env)
    refused = f"error: --host localhost resolved to {address}, which is not a loopback address"
    lines = [x for x in run.stderr.splitlines() if x.startswith(("error:", "exit"))]
    assert [x.split(":")[0] if x.startswith("error") else x for x in lines] == [
        "error", "exit serve 2", "error", "exit review 2"], run.stderr
    assert all(x.startswith(refused) for x in lines if x.startswith("error")), run.stderr
