"""The SMTP pool against a real aiosmtpd server: delivery, reuse, retries, verdicts, AUTH, TLS."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailer.errors import ConfigError
from mailer.transport import (
    MemoryTransport,
    OutgoingMessage,
    SendResult,
    SendStatus,
    SmtpPool,
    SmtpUrl,
    Transport,
    is_hard_bounce,
    redact_smtp_url,
)
from tests.smtp_server import CaptureServer, self_signed_tls

SENDER = "bounces+1@news.example.com"
MESSAGE = (
    b"From: News <news@example.com>\r\n"
    b"To: someone@example.org\r\n"
    b"Subject: Hello\r\n"
    b"\r\n"
    b"Hello there.\r\n"
)


@pytest.fixture
def server() -> Iterator[CaptureServer]:
    with CaptureServer() as capture:
        yield capture


def make_pool(url: str, **options: object) -> SmtpPool:
    settings: dict[str, object] = {
        "size": 2,
        "timeout": 5.0,
        "max_retries": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "local_hostname": "client.test",
    }
    settings.update(options)
    return SmtpPool(url, **settings)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- delivery ----------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "data",
    [
        MESSAGE,
        MESSAGE + b".leading dot\r\n.\r\n..two dots\r\n",
        b".starts with a dot\r\n\r\nbody\r\n",
        "Subject: Grüße\r\n\r\nÄpfel und Birnen\r\n".encode(),
        MESSAGE + b"x" * 998 + b"\r\n" + b"line\r\n" * 2000,
    ],
    ids=["plain", "dots", "leading-dot", "8bit", "large"],
)
async def test_messages_arrive_byte_exact(server: CaptureServer, data: bytes) -> None:
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", data)
    assert result.status is SendStatus.SENT
    assert (result.code, result.stage, result.attempts, result.hard_bounce) == (
        250,
        "data",
        1,
        False,
    )
    [message] = server.messages
    assert message.data == data
    assert message.envelope_from == SENDER
    assert message.recipients == ("someone@example.org",)


@pytest.mark.asyncio
async def test_line_endings_are_normalised_to_crlf(server: CaptureServer) -> None:
    async with make_pool(server.url) as pool:
        await pool.send(SENDER, "someone@example.org", b"Subject: x\n\nbare LF\rbare CR")
    assert server.messages[0].data == b"Subject: x\r\n\r\nbare LF\r\nbare CR\r\n"


@pytest.mark.asyncio
async def test_size_and_8bitmime_are_declared(server: CaptureServer) -> None:
    data = "Subject: Grüße\r\n\r\n.dot\r\n".encode()
    async with make_pool(server.url) as pool:
        await pool.send(SENDER, "someone@example.org", data)
    assert server.messages[0].mail_options == (f"SIZE={len(data)}", "BODY=8BITMIME")


@pytest.mark.asyncio
async def test_internationalised_address_uses_smtputf8(server: CaptureServer) -> None:
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "jörg@exämple.org", MESSAGE)
    assert result.status is SendStatus.SENT
    [message] = server.messages
    assert message.recipients == ("jörg@exämple.org",)
    assert "SMTPUTF8" in message.mail_options


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("sender", "recipient", "stage"),
    [
        (SENDER, "victim@example.org>\r\nRCPT TO:<other@example.org", "rcpt"),
        (SENDER, "two words@example.org", "rcpt"),
        (SENDER, "", "rcpt"),
        (SENDER, "no-at-sign", "rcpt"),
        ("bounce@example.com\r\nRSET", "someone@example.org", "mail"),
    ],
)
async def test_unsafe_addresses_are_refused_without_a_connection(
    server: CaptureServer, sender: str, recipient: str, stage: str
) -> None:
    async with make_pool(server.url) as pool:
        result = await pool.send(sender, recipient, MESSAGE)
    assert result.status is SendStatus.PERMANENT
    assert result.stage == stage
    assert not result.hard_bounce
    assert server.connections == 0


@pytest.mark.asyncio
async def test_null_reverse_path_is_allowed(server: CaptureServer) -> None:
    async with make_pool(server.url) as pool:
        result = await pool.send("", "someone@example.org", MESSAGE)
    assert result.status is SendStatus.SENT
    assert server.messages[0].envelope_from == "<>"


# -- connections -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sequential_sends_reuse_one_connection(server: CaptureServer) -> None:
    async with make_pool(server.url, size=4) as pool:
        for i in range(20):
            result = await pool.send(SENDER, f"user{i}@example.org", MESSAGE)
            assert result.status is SendStatus.SENT
        assert pool.stats.connects == 1
    assert server.connections == 1
    assert len(server.messages) == 20


@pytest.mark.asyncio
async def test_concurrent_sends_use_at_most_size_connections(server: CaptureServer) -> None:
    async with make_pool(server.url, size=3) as pool:
        results = await asyncio.gather(
            *(pool.send(SENDER, f"user{i}@example.org", MESSAGE) for i in range(60))
        )
        assert pool.open_connections <= 3
    assert {r.status for r in results} == {SendStatus.SENT}
    assert 1 <= server.connections <= 3
    assert sorted(m.recipients[0] for m in server.messages) == sorted(
        f"user{i}@example.org" for i in range(60)
    )
    server.wait_closed()  # close() said QUIT on every connection


@pytest.mark.asyncio
async def test_a_transaction_is_mail_rcpt_data_and_nothing_else(server: CaptureServer) -> None:
    async with make_pool(server.url) as pool:
        for i in range(3):
            await pool.send(SENDER, f"user{i}@example.org", MESSAGE)
    verbs = [verb for _, verb in server.commands]
    assert verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3 + ["QUIT"]


@pytest.mark.asyncio
async def test_a_connection_closed_while_idle_is_replaced_without_an_attempt(
    server: CaptureServer,
) -> None:
    async with make_pool(server.url, size=1) as pool:
        await pool.send(SENDER, "first@example.org", MESSAGE)
        server.drop(stage="mail")  # the server hangs up on the reused connection
        result = await pool.send(SENDER, "second@example.org", MESSAGE)
    assert result.status is SendStatus.SENT
    assert result.attempts == 1
    assert server.connections == 2
    assert [m.recipients[0] for m in server.messages] == ["first@example.org", "second@example.org"]


@pytest.mark.asyncio
async def test_closed_pool_refuses_to_send(server: CaptureServer) -> None:
    pool = make_pool(server.url)
    await pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.send(SENDER, "someone@example.org", MESSAGE)


@pytest.mark.asyncio
async def test_cancelled_send_leaves_a_usable_pool(server: CaptureServer) -> None:
    server.delay(2.0, stage="end_of_data", times=1)
    async with make_pool(server.url, size=1) as pool:
        task = asyncio.create_task(pool.send(SENDER, "slow@example.org", MESSAGE))
        for _ in range(500):  # until the content is on its way (at most 5 s)
            if any(verb == "DATA" for _, verb in server.commands):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result = await pool.send(SENDER, "next@example.org", MESSAGE)
    assert result.status is SendStatus.SENT
    assert server.connections == 2


# -- temporary failures and throttling ---------------------------------------------------------


@pytest.mark.asyncio
async def test_421_is_retried_on_a_new_connection(server: CaptureServer) -> None:
    server.reply("421 4.7.0 Too many messages, slow down", stage="mail", times=1)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert pool.stats.throttled == 1
        assert pool.stats.retries == 1
    assert result.status is SendStatus.SENT
    assert result.attempts == 2
    assert server.connections == 2  # the 421 closed the first one
    assert len(server.messages) == 1


@pytest.mark.asyncio
async def test_421_greeting_is_retried(server: CaptureServer) -> None:
    server.reply("421 4.3.2 Not now", stage="connect", times=1)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert result.status is SendStatus.SENT
    assert result.attempts == 2


@pytest.mark.asyncio
async def test_451_is_retried_and_the_envelope_reset(server: CaptureServer) -> None:
    server.reply("451 4.3.0 Try again later", stage="rcpt", times=2)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert pool.stats.throttled == 2
    assert result.status is SendStatus.SENT
    assert result.attempts == 3
    assert [verb for _, verb in server.commands].count("RSET") == 2
    assert len(server.messages) == 1


@pytest.mark.asyncio
async def test_452_at_end_of_data_is_retried(server: CaptureServer) -> None:
    server.reply("452 4.3.1 Insufficient system storage", stage="end_of_data", times=1)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.attempts) == (SendStatus.SENT, 2)
    assert len(server.messages) == 1


@pytest.mark.asyncio
async def test_temporary_failure_is_reported_after_max_retries(server: CaptureServer) -> None:
    server.reply("450 4.2.0 Mailbox busy", stage="rcpt")
    async with make_pool(server.url, max_retries=2) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert pool.stats.temporary == 1
    assert result.status is SendStatus.TEMPORARY
    assert (result.code, result.enhanced, result.stage) == (450, "4.2.0", "rcpt")
    assert result.attempts == 3
    assert not result.hard_bounce
    assert server.messages == []


@pytest.mark.asyncio
async def test_backoff_grows_between_retries(server: CaptureServer) -> None:
    server.reply("450 4.2.0 Mailbox busy", stage="rcpt")
    async with make_pool(server.url, max_retries=3, backoff_base=0.05, backoff_max=10) as pool:
        start = time.monotonic()
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        elapsed = time.monotonic() - start
    assert result.attempts == 4
    # Jittered waits of at least half of 0.05, 0.1 and 0.2 s.
    assert elapsed >= (0.05 + 0.1 + 0.2) / 2


@pytest.mark.asyncio
async def test_throttled_connection_is_paused(server: CaptureServer) -> None:
    server.reply("421 4.7.0 Slow down", stage="mail", times=1)
    async with make_pool(server.url, size=1, backoff_base=0.3, backoff_max=0.3) as pool:
        start = time.monotonic()
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        elapsed = time.monotonic() - start
    assert result.status is SendStatus.SENT
    # The only connection sat out its pause (at least half of 0.3 s with jitter).
    assert elapsed >= 0.15


@pytest.mark.asyncio
async def test_connection_dropped_before_data_is_retried(server: CaptureServer) -> None:
    server.drop(stage="rcpt", times=1)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.attempts) == (SendStatus.SENT, 2)
    assert len(server.messages) == 1


@pytest.mark.asyncio
async def test_connection_dropped_at_data_command_is_retried(server: CaptureServer) -> None:
    server.drop(stage="data", times=1)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.attempts) == (SendStatus.SENT, 2)
    assert len(server.messages) == 1


@pytest.mark.asyncio
async def test_connection_refused_is_temporary() -> None:
    async with make_pool(f"smtp://127.0.0.1:{free_port()}", max_retries=1) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert result.status is SendStatus.TEMPORARY
    assert (result.stage, result.attempts, result.code) == ("connect", 2, None)
    assert "cannot connect" in result.message


@pytest.mark.asyncio
async def test_slow_reply_before_data_times_out_as_temporary(server: CaptureServer) -> None:
    server.delay(1.0, stage="rcpt")
    async with make_pool(server.url, timeout=0.2, max_retries=0) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.stage) == (SendStatus.TEMPORARY, "rcpt")


# -- uncertain outcomes ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_dropped_after_data_is_unknown_and_not_resent(
    server: CaptureServer,
) -> None:
    server.drop(stage="end_of_data", times=1, record=True)
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert pool.stats.unknown == 1
    assert result.status is SendStatus.UNKNOWN
    assert (result.attempts, result.code, result.stage) == (1, None, "data")
    assert "may have been delivered" in result.message
    assert len(server.messages) == 1  # it was delivered; the client never heard so


@pytest.mark.asyncio
async def test_slow_final_reply_is_unknown(server: CaptureServer) -> None:
    server.delay(1.0, stage="end_of_data", times=1)
    async with make_pool(server.url, timeout=0.2) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert result.status is SendStatus.UNKNOWN
        follow_up = await pool.send(SENDER, "next@example.org", MESSAGE)
    assert follow_up.status is SendStatus.SENT


# -- permanent failures ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_550_5_1_1_is_a_permanent_hard_bounce(server: CaptureServer) -> None:
    server.reply(
        "550 5.1.1 <nobody@example.org>: Recipient address rejected",
        recipients={"nobody@example.org"},
    )
    async with make_pool(server.url, size=1) as pool:
        result = await pool.send(SENDER, "nobody@example.org", MESSAGE)
        after = await pool.send(SENDER, "somebody@example.org", MESSAGE)
    assert result.status is SendStatus.PERMANENT
    assert (result.code, result.enhanced, result.stage, result.attempts) == (
        550,
        "5.1.1",
        "rcpt",
        1,
    )
    assert result.hard_bounce
    assert "Recipient address rejected" in result.message
    assert after.status is SendStatus.SENT  # the envelope was reset on the same connection
    assert server.connections == 1
    assert [m.recipients for m in server.messages] == [("somebody@example.org",)]


@pytest.mark.asyncio
async def test_552_is_permanent_but_not_a_bounce(server: CaptureServer) -> None:
    server.reply("552 5.3.4 Message size exceeds fixed limit", stage="end_of_data")
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert result.status is SendStatus.PERMANENT
    assert (result.code, result.enhanced, result.attempts) == (552, "5.3.4", 1)
    assert not result.hard_bounce


@pytest.mark.asyncio
async def test_554_at_data_command_is_permanent(server: CaptureServer) -> None:
    server.reply("554 5.7.1 Rejected by policy", stage="data")
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.code, result.stage) == (SendStatus.PERMANENT, 554, "data")
    assert not result.hard_bounce


@pytest.mark.asyncio
async def test_plain_550_without_enhanced_code_is_not_a_hard_bounce(server: CaptureServer) -> None:
    server.reply("550 User unknown")
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.enhanced, result.hard_bounce) == (
        SendStatus.PERMANENT,
        None,
        False,
    )


@pytest.mark.asyncio
async def test_sender_refused_is_permanent_and_never_a_bounce(server: CaptureServer) -> None:
    server.reply("553 5.1.8 Sender address domain does not exist", stage="mail")
    async with make_pool(server.url) as pool:
        result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.stage, result.hard_bounce) == (
        SendStatus.PERMANENT,
        "mail",
        False,
    )


@pytest.mark.parametrize(
    ("code", "text", "stage", "status", "hard"),
    [
        (250, "2.0.0 Ok", "data", SendStatus.SENT, False),
        (550, "5.1.1 No such user", "rcpt", SendStatus.PERMANENT, True),
        (550, "5.1.2 Bad destination domain", "rcpt", SendStatus.PERMANENT, True),
        (550, "5.1.0 Address rejected", "rcpt", SendStatus.PERMANENT, True),
        (556, "5.1.10 Null MX", "rcpt", SendStatus.PERMANENT, True),
        (550, "5.1.1 No such user", "data", SendStatus.PERMANENT, True),
        (550, "5.1.1 No such user", "mail", SendStatus.PERMANENT, False),
        (553, "5.1.7 Bad sender address syntax", "rcpt", SendStatus.PERMANENT, False),
        (550, "5.7.1 Spam", "rcpt", SendStatus.PERMANENT, False),
        (550, "User unknown", "rcpt", SendStatus.PERMANENT, False),
        (550, "5.1.15 Not a real code", "rcpt", SendStatus.PERMANENT, True),
        (450, "4.1.1 Try later", "rcpt", SendStatus.TEMPORARY, False),
        (421, "4.7.0 Slow down", "mail", SendStatus.TEMPORARY, False),
    ],
)
def test_reply_classification(
    code: int, text: str, stage: str, status: SendStatus, hard: bool
) -> None:
    result = SendResult.from_reply(code, text, stage=stage)  # type: ignore[arg-type]
    assert result.status is status
    assert result.hard_bounce is hard


def test_throttle_replies() -> None:
    assert SendResult.from_reply(421, "4.7.0 Slow down").throttled
    assert SendResult.from_reply(451, "Try later").throttled
    assert SendResult.from_reply(454, "4.7.0 TLS not available").throttled
    assert SendResult.from_reply(450, "4.7.1 Rate limited").throttled
    assert not SendResult.from_reply(450, "4.2.0 Mailbox busy").throttled
    assert not SendResult.from_reply(550, "5.7.1 Denied").throttled
    assert not is_hard_bounce(None, "rcpt")


# -- AUTH and TLS ------------------------------------------------------------------------------

USER = "news@example.com"
PASSWORD = "s3cret:p@ss/word%"


@pytest.mark.asyncio
async def test_auth_with_percent_encoded_credentials() -> None:
    with CaptureServer(credentials={USER: PASSWORD}) as server:
        async with make_pool(server.url_for(USER, PASSWORD), size=2) as pool:
            results = await asyncio.gather(
                *(pool.send(SENDER, f"user{i}@example.org", MESSAGE) for i in range(4))
            )
        assert {r.status for r in results} == {SendStatus.SENT}
        assert server.logins == [USER] * server.connections
        assert {m.login for m in server.messages} == {USER}


@pytest.mark.asyncio
async def test_server_requiring_auth_refuses_anonymous_mail() -> None:
    with CaptureServer(credentials={USER: PASSWORD}) as server:
        async with make_pool(server.url) as pool:
            result = await pool.send(SENDER, "someone@example.org", MESSAGE)
    assert (result.status, result.code, result.stage) == (SendStatus.PERMANENT, 530, "mail")


@pytest.mark.asyncio
async def test_wrong_password_is_a_config_error_that_hides_the_password() -> None:
    with CaptureServer(credentials={USER: PASSWORD}) as server:
        async with make_pool(server.url_for(USER, "wrong-secret")) as pool:
            with pytest.raises(ConfigError) as caught:
                await pool.send(SENDER, "someone@example.org", MESSAGE)
            assert "wrong-secret" not in repr(pool)
    text = str(caught.value)
    assert "rejected the credentials" in text
    assert "wrong-secret" not in text
    assert "***" in text
    assert server.messages == []


def test_url_parsing_and_redaction() -> None:
    url = SmtpUrl.parse("smtp://user%40example.com:p%3Ass@127.0.0.1:2525?starttls=false")
    assert (url.scheme, url.host, url.port) == ("smtp", "127.0.0.1", 2525)
    assert (url.username, url.password, url.starttls) == ("user@example.com", "p:ss", "false")
    assert url.display == "smtp://user%40example.com:***@127.0.0.1:2525?starttls=false"
    assert "p:ss" not in repr(url)
    assert url.is_loopback
    assert SmtpUrl.parse("smtps://[::1]").port == 465
    assert SmtpUrl.parse("smtps://[::1]").display == "smtps://[::1]:465"
    assert SmtpUrl.parse("smtp://localhost").port == 25
    assert not SmtpUrl.parse("smtp://mail.example.com").is_loopback
    assert redact_smtp_url("smtp://u:secret@host:25") == "smtp://u:***@host:25"
    assert redact_smtp_url("nonsense") == "<unparseable URL>"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:25", "use smtp://"),
        ("smtp://", "no host"),
        ("smtp://127.0.0.1:25/path", "unexpected path"),
        ("smtp://127.0.0.1:25?tls=1", "unknown option"),
        ("smtp://127.0.0.1:25?starttls=maybe", "starttls must be"),
        ("smtps://127.0.0.1:465?starttls=true", "smtp:// only"),
        ("smtp://u:secret@127.0.0.1:99999", "invalid SMTP URL"),
    ],
)
def test_bad_urls_are_config_errors_without_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        SmtpPool(url)
    assert "secret" not in str(caught.value)


def test_pool_options_are_checked() -> None:
    with pytest.raises(ConfigError):
        SmtpPool("smtp://127.0.0.1", size=0)
    with pytest.raises(ConfigError):
        SmtpPool("smtp://127.0.0.1", rate=0)
    with pytest.raises(ConfigError):
        SmtpPool("smtp://127.0.0.1", max_retries=-1)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    return self_signed_tls(tmp_path)


@pytest.mark.asyncio
async def test_starttls_is_used_when_offered_and_auth_goes_over_it(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, client_tls = tls
    with CaptureServer(credentials={USER: PASSWORD}, tls_context=server_tls) as server:
        url = server.url_for(USER, PASSWORD)
        async with make_pool(url, tls_context=client_tls) as pool:
            result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert result.status is SendStatus.SENT
        [message] = server.messages
        assert message.tls
        assert message.login == USER
        assert "STARTTLS" in [verb for _, verb in server.commands]


@pytest.mark.asyncio
async def test_implicit_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_tls, client_tls = tls
    with CaptureServer(tls_context=server_tls, implicit_tls=True) as server:
        assert server.url.startswith("smtps://")
        async with make_pool(server.url, tls_context=client_tls) as pool:
            result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert result.status is SendStatus.SENT
        assert server.messages[0].data == MESSAGE
        assert server.messages[0].tls


@pytest.mark.asyncio
async def test_untrusted_certificate_is_a_config_error(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_tls, _ = tls
    with CaptureServer(tls_context=server_tls) as server:
        async with make_pool(server.url) as pool:
            with pytest.raises(ConfigError, match="TLS"):
                await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert server.messages == []


@pytest.mark.asyncio
async def test_starttls_false_stays_plain(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_tls, _ = tls
    with CaptureServer(tls_context=server_tls) as server:
        async with make_pool(server.url + "?starttls=false") as pool:
            result = await pool.send(SENDER, "someone@example.org", MESSAGE)
        assert result.status is SendStatus.SENT
        assert not server.messages[0].tls


@pytest.mark.asyncio
async def test_starttls_required_but_not_offered(server: CaptureServer) -> None:
    async with make_pool(server.url + "?starttls=true") as pool:
        with pytest.raises(ConfigError, match="does not offer STARTTLS"):
            await pool.send(SENDER, "someone@example.org", MESSAGE)


# -- rate limits -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rate_limit_holds_through_the_pool(server: CaptureServer) -> None:
    async with make_pool(server.url, size=4, rate=40) as pool:
        start = time.monotonic()
        results = await asyncio.gather(
            *(pool.send(SENDER, f"user{i}@d{i}.example", MESSAGE) for i in range(20))
        )
        elapsed = time.monotonic() - start
    assert {r.status for r in results} == {SendStatus.SENT}
    assert elapsed >= 19 / 40 - 0.01


@pytest.mark.asyncio
async def test_per_domain_rate_limit_holds_through_the_pool(server: CaptureServer) -> None:
    async with make_pool(server.url, size=4, per_domain_rate=20) as pool:
        start = time.monotonic()
        await asyncio.gather(
            *(pool.send(SENDER, f"user{i}@slow.example", MESSAGE) for i in range(8)),
            *(pool.send(SENDER, f"user{i}@other{i}.example", MESSAGE) for i in range(8)),
        )
        elapsed = time.monotonic() - start
    assert elapsed >= 7 / 20 - 0.01
    assert len(server.messages) == 16


# -- the in-memory double ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_memory_transport_records_and_follows_its_script() -> None:
    def script(message: OutgoingMessage) -> SendResult:
        if message.recipient.startswith("gone"):
            return SendResult.from_reply(550, "5.1.1 No such user", stage="rcpt")
        if message.recipient.startswith("lost"):
            return SendResult.unknown("connection lost after DATA")
        return SendResult.sent()

    transport: Transport = MemoryTransport(script)
    async with MemoryTransport(script) as memory:
        transport = memory
        ok = await transport.send(SENDER, "one@example.org", MESSAGE)
        gone = await transport.send(SENDER, "gone@example.org", MESSAGE)
        lost = await transport.send(SENDER, "lost@example.org", MESSAGE)
    assert (ok.status, gone.status, lost.status) == (
        SendStatus.SENT,
        SendStatus.PERMANENT,
        SendStatus.UNKNOWN,
    )
    assert gone.hard_bounce
    assert memory.messages == [OutgoingMessage(SENDER, "one@example.org", MESSAGE)]
    assert [call.recipient for call, _ in memory.calls] == [
        "one@example.org",
        "gone@example.org",
        "lost@example.org",
    ]
    assert memory.closed
    with pytest.raises(RuntimeError):
        await memory.send(SENDER, "one@example.org", MESSAGE)


@pytest.mark.asyncio
async def test_memory_transport_accepts_async_scripts_and_sends_by_default() -> None:
    async def slow(message: OutgoingMessage) -> SendResult:
        await asyncio.sleep(0)
        return SendResult.from_reply(451, "4.3.0 later")

    assert (
        await MemoryTransport(slow).send(SENDER, "a@example.org", MESSAGE)
    ).status == "temporary"
    default = MemoryTransport()
    assert (await default.send(SENDER, "a@example.org", MESSAGE)).status is SendStatus.SENT
    assert len(default.messages) == 1
