"""The `mtad` operator commands as an operator types them, against a real database."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mtad.model import Reply

from support.daemon import PASSWORD, DaemonProcess, daemon_document, write_config
from support.smtp_client import RawSMTP


def mtad(config, *args, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtad", "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def config(db_url, tmp_path):
    return write_config(tmp_path / "mtad.toml", daemon_document(db_url, tmp_path / "state"))


def test_tenant_lifecycle_from_the_command_line(config):
    added = mtad(config, "tenant", "add", "initech", "--password-stdin", stdin="a long enough password\n")
    assert added.returncode == 0, added.stderr
    assert mtad(config, "tenant", "domain", "add", "initech", "Initech.Example").returncode == 0
    listing = mtad(config, "tenant", "list")
    assert "initech [marketing]: initech.example" in listing.stdout
    assert mtad(config, "tenant", "class", "initech", "transactional").returncode == 0
    assert "initech [transactional]" in mtad(config, "tenant", "list").stdout
    again = mtad(config, "tenant", "add", "initech", "--password-stdin", stdin="a long enough password\n")
    assert again.returncode == 1 and "exists already" in again.stderr
    short = mtad(config, "tenant", "add", "other", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "12 characters" in short.stderr


def test_a_domain_belongs_to_one_tenant_only(config):
    for name in ("one", "two"):
        assert mtad(config, "tenant", "add", name, "--password-stdin", stdin="a long enough password\n").returncode == 0
    assert mtad(config, "tenant", "domain", "add", "one", "shared.example").returncode == 0
    taken = mtad(config, "tenant", "domain", "add", "two", "shared.example")
    assert taken.returncode == 1 and "already belongs" in taken.stderr


def test_password_file_is_read_and_never_echoed(config, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("a very secret password\n")
    result = mtad(config, "tenant", "add", "filed", "--password-file", str(secret))
    assert result.returncode == 0 and "a very secret password" not in result.stdout + result.stderr


async def test_queue_summary_and_show_report_a_submitted_message(db_url, tenants, tmp_path, config):
    process = DaemonProcess(config)
    process.start()
    try:
        client, _ = await RawSMTP.open(process.ports[0])
        await client.authenticated("acme", PASSWORD)
        await client.command("MAIL FROM:<news@acme.example>")
        await client.command("RCPT TO:<a@example.net>")
        await client.command("RCPT TO:<b@example.org>")
        await client.command("DATA")
        code, text = await client.command(b"From: news@acme.example\r\n\r\nhi\r\n.")
        assert code == 250
        queue_id = text.rsplit(" ", 1)[1]
        await client.close()
    finally:
        process.kill()
    summary = mtad(config, "queue", "summary", "--json")
    assert summary.returncode == 0, summary.stderr
    data = json.loads(summary.stdout)
    assert data["by_state"] == {"queued": 2} and data["pending"] == 2
    assert {row["domain"] for row in data["by_domain"]} == {"example.net", "example.org"}
    assert data["by_tenant"] == [{"tenant": "acme", "recipients": 2}]
    assert data["oldest_pending_age_s"] >= 0
    text_summary = mtad(config, "queue", "summary").stdout
    assert "queued 2" in text_summary
    shown = mtad(config, "queue", "show", queue_id)
    assert shown.returncode == 0
    assert "a@example.net" in shown.stdout and "queued" in shown.stdout and "127.0.0.0" in shown.stdout
    assert mtad(config, "queue", "show", "NOSUCHID").returncode == 1


def test_a_wrong_config_fails_at_start_with_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[submission]\nmax_recipients = "lots"\n')
    result = mtad(bad, "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mtad: config error: submission.max_recipients: expected an integer, got 'lots'"
    ]


def test_environment_overrides_name_their_variable_when_wrong(tmp_path, config):
    import os

    result = mtad(config, "queue", "summary", env={**os.environ, "MTAD_QUEUE_LEASE": "soon"})
    assert result.returncode == 2
    assert "queue.lease" in result.stderr and "MTAD_QUEUE_LEASE" in result.stderr


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by make setup")
async def test_swaks_as_printed_by_make_run_queues_a_message(db_url, tenants, config, pool):
    process = DaemonProcess(config)
    process.start()
    try:
        result = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{process.ports[0]}", "--tls", "--auth", "PLAIN",
             "--auth-user", "acme", "--auth-password", PASSWORD, "--from", "hello@acme.example",
             "--h-From", "hello@acme.example", "--to", "someone@example.net"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        process.kill()
    assert result.returncode == 0, result.stdout[-2000:]
    assert "queued as" in result.stdout
    assert await pool.fetchval("SELECT count(*) FROM recipients WHERE address = 'someone@example.net'") == 1


async def test_pause_parks_a_domain_resume_and_retry_make_it_due_and_cancel_needs_a_filter(db_url, tenants, pool, config):
    from datetime import datetime, timedelta, timezone

    from mtad.model import EnvelopeRecipient, Submission
    from mtad.queue.store import QueueStore

    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    now = datetime.now(timezone.utc)
    await QueueStore(pool).insert_submission(
        Submission("QP1", tenant_id, "a@acme.example",
                   (EnvelopeRecipient("x@paused.example", "paused.example"), EnvelopeRecipient("y@other.example", "other.example")),
                   b"From: a@acme.example\r\n\r\nx\r\n", "127.0.0.0", now)
    )
    assert mtad(config, "queue", "pause", "--domain", "paused.example").stdout.strip() == "pause: paused.example: 1 recipients"
    claims = await QueueStore(pool).claim("n", 10, 60, now + timedelta(hours=1))
    assert [c.address for c in claims] == ["y@other.example"]  # the paused domain is not claimed
    summary = json.loads(mtad(config, "queue", "summary", "--json").stdout)
    assert summary["paused"][0]["domain"] == "paused.example"
    assert "resume: paused.example: 1" in mtad(config, "queue", "resume", "--domain", "paused.example").stdout
    claims = await QueueStore(pool).claim("n", 10, 60, now + timedelta(hours=1))
    assert [c.address for c in claims] == ["x@paused.example"]
    await QueueStore(pool).defer("n", [claims[0].recipient_id], Reply(450, "4.2.0", "busy"), now + timedelta(days=1), now)
    assert "retry: all: 1 recipients" in mtad(config, "queue", "retry").stdout
    assert await pool.fetchval("SELECT next_attempt_at <= now() FROM recipients WHERE address = 'x@paused.example'")
    refused = mtad(config, "queue", "cancel")
    assert refused.returncode == 1 and "refusing" in refused.stderr
    assert "cancel: QP1: 1 recipients" in mtad(config, "queue", "cancel", "--queue-id", "QP1").stdout
    assert await pool.fetchval("SELECT state FROM recipients WHERE address = 'x@paused.example'") == "cancelled"


async def test_suppress_add_list_export_import_remove_and_events(db_url, tenants, pool, config, tmp_path):
    from datetime import datetime, timezone

    from mtad.model import EnvelopeRecipient, Submission
    from mtad.queue.store import QueueStore

    tenant_id = await pool.fetchval("SELECT id FROM tenants WHERE name = 'acme'")
    await QueueStore(pool).insert_submission(
        Submission("QS1", tenant_id, "a@acme.example", (EnvelopeRecipient("Gone@x.example", "x.example"),),
                   b"From: a@acme.example\r\n\r\nx\r\n", "127.0.0.0", datetime.now(timezone.utc))
    )
    added = mtad(config, "suppress", "add", "--tenant", "acme", "gone@x.example", "not-an-address")
    assert "suppressed 1 addresses for acme; 1 pending recipients cancelled" in added.stdout
    assert "skipped" in added.stderr
    assert "gone@x.example  manual" in mtad(config, "suppress", "list", "--tenant", "acme").stdout
    assert mtad(config, "suppress", "list", "--tenant", "globex").stdout == ""  # another tenant sees nothing
    exported = mtad(config, "suppress", "export", "--tenant", "acme").stdout
    assert exported.splitlines()[0] == "address,list,reason,source,created_at"
    (tmp_path / "list.csv").write_text(exported)
    imported = mtad(config, "suppress", "import", "--tenant", "globex", str(tmp_path / "list.csv"))
    assert "suppressed 1 addresses for globex" in imported.stdout
    assert "removed 1" in mtad(config, "suppress", "remove", "--tenant", "acme", "gone@x.example").stdout
    events = mtad(config, "events", "--message", "QS1")
    assert "cancelled" in events.stdout and "address suppressed: manual" in events.stdout
    by_recipient = json.loads(mtad(config, "events", "--recipient", "GONE@x.example", "--json").stdout)
    assert [e["kind"] for e in by_recipient] == ["cancelled"]


def test_db_commands_manage_the_embedded_cluster(tmp_path):
    import shutil
    import tempfile
    from pathlib import Path

    state = Path(tempfile.mkdtemp(prefix="mtad-test-db-cli-"))
    state.chmod(0o755)  # reachable by the postgres user when the suite runs as root
    config = write_config(tmp_path / "embedded.toml", {"state_dir": str(state)})
    try:
        started = mtad(config, "db", "start")
        assert started.returncode == 0 and started.stdout.startswith("started running"), started.stderr
        assert mtad(config, "db", "start").stdout.startswith("already running")
        assert mtad(config, "db", "status").returncode == 0
        url = mtad(config, "db", "url").stdout.strip()
        assert url.startswith("postgresql://mtad:") and str(state) in url
        assert mtad(config, "migrate").stdout.strip().startswith("applied 0001_queue")
        assert mtad(config, "migrate").stdout.strip() == "schema up to date"
        assert mtad(config, "db", "stop").returncode == 0
        assert mtad(config, "db", "status").returncode == 3
    finally:
        mtad(config, "db", "stop")
        shutil.rmtree(state, ignore_errors=True)
