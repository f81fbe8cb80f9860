"""One delivery's message: sandboxed rendering, signed links, MIME. Compiled once per campaign."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailer.campaigns import CampaignDefinition
from mailer.config import Settings
from mailer.delivery_store import Claimed
from mailer.errors import BadInput, ConfigError
from mailer.message import DkimConfig, MessageTemplate, build_message_template
from mailer.models import HONEYPOT_POSITION
from mailer.render import CompiledCampaign, compile_campaign
from mailer.runner import Composed
from mailer.tokens import TokenKind, Tokens


def default_reason(definition: CampaignDefinition, settings: Settings) -> str:
    return (
        f"You receive this e-mail because you agreed to receive {definition.purpose} e-mail "
        f"from {settings.sender_name}."
    )


def compile_definition(definition: CampaignDefinition, settings: Settings) -> CompiledCampaign:
    if not settings.postal_address or not settings.postal_address.strip():
        raise ConfigError(
            "set MAILER_POSTAL_ADDRESS (or postal_address in mailer.toml): every marketing "
            "mail must name the sender's postal address"
        )
    return compile_campaign(
        definition.html_source,
        definition.text_source,
        definition.subject,
        template_name=str(definition.template),
        text_template_name=str(definition.text_template) if definition.text_template else None,
        sender={"name": settings.sender_name, "postal_address": settings.postal_address},
        reason=definition.reason or default_reason(definition, settings),
        track_clicks=definition.track_clicks,
        track_opens=definition.track_opens,
    )


def dkim_config(settings: Settings) -> DkimConfig | None:
    if not (settings.dkim_selector and settings.dkim_key_file):
        return None
    try:
        key = Path(settings.dkim_key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{settings.dkim_key_file}: cannot read DKIM key: {exc.strerror}"
        ) from None
    return DkimConfig(
        selector=settings.dkim_selector,
        domain=settings.dkim_domain or "",
        private_key_pem=key,
    )


class CampaignComposer:
    """Everything constant is prepared here once; `compose` does only the per-contact work."""

    def __init__(
        self, definition: CampaignDefinition, campaign_id: int, settings: Settings
    ) -> None:
        self.definition = definition
        self.campaign_id = campaign_id
        self.base_url = settings.base_url
        self.tokens = Tokens(settings.secret_keys)
        self.compiled = compile_definition(definition, settings)
        if len(self.compiled.links) >= HONEYPOT_POSITION:
            raise BadInput(
                f"{definition.path}: a campaign can have at most {HONEYPOT_POSITION - 1} links"
            )
        dkim = dkim_config(settings)
        if dkim is not None and not dkim.domain:
            dkim = DkimConfig(dkim.selector, definition.domain, dkim.private_key_pem)
        self.message: MessageTemplate = build_message_template(
            from_address=definition.from_address,
            from_name=definition.from_name,
            reply_to=definition.reply_to,
            list_id_name=definition.list_name,
            campaign_slug=definition.name,
            domain=definition.domain,
            feedback_id=f"{campaign_id}:{definition.name}:{definition.purpose}:mailer",
            verp_key=settings.verp_key,
            base_url=settings.base_url,
            dkim=dkim,
        )
        self.campaign_context = {
            "name": definition.name,
            "purpose": definition.purpose,
            "list_name": definition.list_name,
        }

    def compose(self, claimed: Claimed) -> Composed:
        delivery_id = claimed.delivery_id
        recipient = claimed.recipient
        sign = self.tokens.sign
        base = self.base_url
        unsubscribe_token = sign(TokenKind.UNSUBSCRIBE, (delivery_id,))
        # Open and click tokens carry the campaign too, so the tracking app can answer and
        # record them without asking the database which campaign a delivery belongs to.
        campaign_id = self.campaign_id
        click_url = None
        open_url = honeypot_url = None
        if claimed.tracking and self.definition.track_clicks:

            def click_url(position: int) -> str:
                return f"{base}/c/{sign(TokenKind.CLICK, (delivery_id, campaign_id, position))}"

            honeypot_url = click_url(HONEYPOT_POSITION)
        if claimed.tracking and self.definition.track_opens:
            open_url = f"{base}/o/{sign(TokenKind.OPEN, (delivery_id, campaign_id))}"
        context: dict[str, Any] = {"contact": recipient, "campaign": self.campaign_context}
        rendered = self.compiled.render(
            context,
            unsubscribe_url=f"{base}/u/{unsubscribe_token}",
            preferences_url=f"{base}/p/{sign(TokenKind.PREFERENCES, (delivery_id,))}",
            click_url=click_url,
            open_url=open_url,
            honeypot_url=honeypot_url,
        )
        name = recipient.name or " ".join(
            part for part in (recipient.first_name, recipient.last_name) if part
        )
        built = self.message.build(
            delivery_id=delivery_id,
            to_address=recipient.email,
            to_name=name or None,
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            unsubscribe_token=unsubscribe_token,
        )
        return Composed(built.envelope_from, built.recipient, built.data, built.message_id)
