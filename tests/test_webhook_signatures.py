"""Webhook signatures are Standard Webhooks v1, checked against the independent reference
implementation (the `standardwebhooks` package)."""

from __future__ import annotations

import json
import time

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from mailer.webhooks import WebhookVerificationError, new_secret, signed_headers, verify

BODY = json.dumps({"type": "consent.withdrawn", "timestamp": "2026-11-25T10:00:00Z", "data": {}})


def test_our_signature_verifies_with_the_reference_library() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signed_headers([secret], "evt_1", now, BODY.encode())
    assert standardwebhooks.Webhook(secret).verify(BODY, headers) == json.loads(BODY)


@given(
    body=st.text(max_size=300), message_id=st.from_regex(r"evt_[A-Za-z0-9]{1,20}", fullmatch=True)
)
def test_reference_signatures_verify_with_ours(body: str, message_id: str) -> None:
    secret = new_secret()
    payload = json.dumps({"data": body})
    now = int(time.time())
    reference = standardwebhooks.Webhook(secret)
    from datetime import UTC, datetime

    sig = reference.sign(message_id, datetime.fromtimestamp(now, UTC), payload)
    headers = {"webhook-id": message_id, "webhook-timestamp": str(now), "webhook-signature": sig}
    assert verify(payload.encode(), headers, secret) == {"data": body}


def test_tampering_wrong_secret_and_old_timestamps_are_refused() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = signed_headers([secret], "evt_1", now, BODY.encode())
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY.replace("withdrawn", "granted").encode(), headers, secret)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY.encode(), headers, new_secret())
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(BODY.encode(), {**headers, "webhook-id": "evt_2"}, secret)
    old = signed_headers([secret], "evt_1", now - 600, BODY.encode())
    with pytest.raises(WebhookVerificationError, match="too far"):
        verify(BODY.encode(), old, secret)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(BODY.encode(), {"webhook-id": "evt_1"}, secret)


def test_during_rotation_both_secrets_sign() -> None:
    old, new = new_secret(), new_secret()
    headers = signed_headers([old, new], "evt_9", int(time.time()), BODY.encode())
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        assert verify(BODY.encode(), headers, secret)["type"] == "consent.withdrawn"
        standardwebhooks.Webhook(secret).verify(BODY, headers)
