"""The words of the recipient pages and the confirmation mail, in Dutch and English.

The language is the contact's own (`contacts.locale`), else the first supported language of the
request's Accept-Language, else English. Every key exists in every language (a test checks),
so a page never shows a key or half a translation.
"""

from __future__ import annotations

import re
from typing import Literal, cast

Language = Literal["en", "nl"]
LANGUAGES: tuple[Language, ...] = ("en", "nl")
DEFAULT_LANGUAGE: Language = "en"
LANGUAGE_NAMES: dict[Language, str] = {"en": "English", "nl": "Nederlands"}

MAX_ACCEPT_LANGUAGE = 512  # longer headers are not worth parsing
_RANGE = re.compile(
    r"^\s*([A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*)\s*(?:;\s*q\s*=\s*([0-9.]+))?\s*$"
)

MESSAGES: dict[str, dict[Language, str]] = {
    # shared
    "page.not_found.title": {
        "en": "This link does not work",
        "nl": "Deze link werkt niet",
    },
    "page.not_found.body": {
        "en": "The link is incomplete or not valid. Copy the whole link from the e-mail, "
        "or use the link in a more recent e-mail.",
        "nl": "De link is onvolledig of ongeldig. Kopieer de hele link uit de e-mail, "
        "of gebruik de link in een recentere e-mail.",
    },
    "page.bad_request.title": {
        "en": "That did not work",
        "nl": "Dat is niet gelukt",
    },
    "page.bad_request.body": {
        "en": "The request could not be processed: {reason}",
        "nl": "Het verzoek kon niet worden verwerkt: {reason}",
    },
    "page.too_large.body": {
        "en": "The request is too large.",
        "nl": "Het verzoek is te groot.",
    },
    "page.unsupported.body": {
        "en": "The form was sent in a format this page does not accept.",
        "nl": "Het formulier is verstuurd in een vorm die deze pagina niet accepteert.",
    },
    "page.unavailable.title": {
        "en": "Temporarily unavailable",
        "nl": "Tijdelijk niet beschikbaar",
    },
    "page.unavailable.body": {
        "en": "Nothing was changed. Please try again in a few minutes.",
        "nl": "Er is niets gewijzigd. Probeer het over een paar minuten opnieuw.",
    },
    "page.rate_limited.title": {
        "en": "Too many attempts",
        "nl": "Te veel pogingen",
    },
    "page.rate_limited.body": {
        "en": "Too many sign-ups came from your connection in a short time. "
        "Please try again later.",
        "nl": "Er kwamen in korte tijd te veel aanmeldingen vanaf uw verbinding. "
        "Probeer het later opnieuw.",
    },
    "footer.sent_by": {"en": "Sent by {name}", "nl": "Verstuurd door {name}"},
    "footer.website": {"en": "Website", "nl": "Website"},
    "address.label": {"en": "E-mail address", "nl": "E-mailadres"},
    "skip": {"en": "Skip to content", "nl": "Naar de inhoud"},
    "notice.label": {
        "en": "Change to our privacy statement",
        "nl": "Wijziging van onze privacyverklaring",
    },
    # unsubscribe
    "unsubscribe.title": {"en": "Unsubscribe", "nl": "Afmelden"},
    "unsubscribe.intro": {
        "en": "Do you no longer want to receive e-mail like “{campaign}” from {sender}?",
        "nl": "Wilt u geen e-mail zoals “{campaign}” van {sender} meer ontvangen?",
    },
    "unsubscribe.effect": {
        "en": "After you unsubscribe we will not send marketing e-mail to this address.",
        "nl": "Na het afmelden sturen wij geen marketingmail meer naar dit adres.",
    },
    "unsubscribe.button": {"en": "Unsubscribe", "nl": "Afmelden"},
    "unsubscribe.already": {
        "en": "This address is already unsubscribed. You do not need to do anything.",
        "nl": "Dit adres is al afgemeld. U hoeft niets te doen.",
    },
    "unsubscribe.preferences_hint": {
        "en": "Prefer to choose which e-mail you receive?",
        "nl": "Liever zelf kiezen welke e-mail u ontvangt?",
    },
    "unsubscribe.preferences_link": {
        "en": "Change your preferences",
        "nl": "Voorkeuren wijzigen",
    },
    "unsubscribed.title": {"en": "You are unsubscribed", "nl": "U bent afgemeld"},
    "unsubscribed.body": {
        "en": "We will not send marketing e-mail to {address} any more. "
        "It can take a moment for e-mail that is already on its way to stop.",
        "nl": "Wij sturen geen marketingmail meer naar {address}. "
        "E-mail die al onderweg is, kan nog even aankomen.",
    },
    "unsubscribed.mistake": {
        "en": "Unsubscribed by mistake? You can sign up again on our website; "
        "you will then be asked to confirm by e-mail.",
        "nl": "Per ongeluk afgemeld? U kunt zich opnieuw aanmelden via onze website; "
        "u bevestigt dat dan per e-mail.",
    },
    # subscribe
    "subscribed.title": {"en": "Check your inbox", "nl": "Kijk in uw mailbox"},
    "subscribed.body": {
        "en": "If the address you entered can receive e-mail, a message with a confirmation "
        "link is on its way to it. Your sign-up only counts once you confirm it.",
        "nl": "Als het opgegeven adres e-mail kan ontvangen, is er een bericht met een "
        "bevestigingslink naar onderweg. Uw aanmelding telt pas als u die bevestigt.",
    },
    "subscribed.not_received": {
        "en": "Nothing arrived? Check your spam folder. The link is valid for 7 days.",
        "nl": "Niets ontvangen? Kijk ook in uw map met ongewenste e-mail. "
        "De link is 7 dagen geldig.",
    },
    # confirm
    "confirm.title": {"en": "Confirm your subscription", "nl": "Bevestig uw aanmelding"},
    "confirm.intro": {
        "en": "Please confirm that {address} may receive the following from {sender}:",
        "nl": "Bevestig dat {address} het volgende van {sender} mag ontvangen:",
    },
    "confirm.wording": {
        "en": "What you agreed to when signing up:",
        "nl": "Waarmee u instemde bij het aanmelden:",
    },
    "confirm.button": {"en": "Confirm", "nl": "Bevestigen"},
    "confirm.ignore": {
        "en": "Did you not sign up? Then ignore this page: nothing happens without "
        "your confirmation.",
        "nl": "Heeft u zich niet aangemeld? Negeer deze pagina dan: zonder uw bevestiging "
        "gebeurt er niets.",
    },
    "confirmed.title": {"en": "Thank you, you are subscribed", "nl": "Bedankt, u bent aangemeld"},
    "confirmed.body": {
        "en": "Your subscription for {address} is confirmed. Every e-mail we send you has a "
        "link to unsubscribe or change your preferences.",
        "nl": "Uw aanmelding voor {address} is bevestigd. In elke e-mail die wij u sturen "
        "staat een link om u af te melden of uw voorkeuren te wijzigen.",
    },
    "confirm.expired.title": {"en": "This link has expired", "nl": "Deze link is verlopen"},
    "confirm.expired.body": {
        "en": "Confirmation links are valid for 7 days. Nothing was changed. "
        "Sign up again to receive a new link.",
        "nl": "Bevestigingslinks zijn 7 dagen geldig. Er is niets gewijzigd. "
        "Meld u opnieuw aan om een nieuwe link te ontvangen.",
    },
    "confirm.used.title": {"en": "Already confirmed", "nl": "Al bevestigd"},
    "confirm.used.body": {
        "en": "This subscription was already confirmed. You do not need to do anything.",
        "nl": "Deze aanmelding is al bevestigd. U hoeft niets te doen.",
    },
    # preference centre
    "preferences.title": {"en": "Your e-mail preferences", "nl": "Uw e-mailvoorkeuren"},
    "preferences.intro": {
        "en": "Choose what {sender} may send to {address}.",
        "nl": "Kies wat {sender} naar {address} mag sturen.",
    },
    "preferences.purposes": {"en": "I would like to receive", "nl": "Ik ontvang graag"},
    "preferences.pending": {
        "en": "waiting for your confirmation by e-mail",
        "nl": "wacht op uw bevestiging per e-mail",
    },
    "preferences.profile": {"en": "Your details", "nl": "Uw gegevens"},
    "preferences.name": {"en": "Name", "nl": "Naam"},
    "preferences.language": {"en": "Language", "nl": "Taal"},
    "preferences.save": {"en": "Save preferences", "nl": "Voorkeuren opslaan"},
    "preferences.saved": {
        "en": "Your preferences are saved.",
        "nl": "Uw voorkeuren zijn opgeslagen.",
    },
    "preferences.nothing_changed": {
        "en": "Nothing needed changing.",
        "nl": "Er hoefde niets te veranderen.",
    },
    "preferences.confirmation_sent": {
        "en": "This address was unsubscribed earlier. To subscribe again, please confirm: "
        "we have sent a confirmation e-mail to {address}.",
        "nl": "Dit adres was eerder afgemeld. Om u opnieuw aan te melden vragen wij u dat "
        "te bevestigen: wij hebben een bevestigingsmail gestuurd naar {address}.",
    },
    "preferences.confirmation_recent": {
        "en": "This address was unsubscribed earlier. We recently sent a confirmation e-mail "
        "to {address}: please use the link in it to subscribe again.",
        "nl": "Dit adres was eerder afgemeld. Wij hebben onlangs een bevestigingsmail "
        "gestuurd naar {address}: gebruik de link daarin om u opnieuw aan te melden.",
    },
    "preferences.suppressed": {
        "en": "We do not send marketing e-mail to this address at the moment.",
        "nl": "Wij sturen op dit moment geen marketingmail naar dit adres.",
    },
    "preferences.unsubscribe_all": {
        "en": "Unsubscribe from everything",
        "nl": "Afmelden voor alles",
    },
    "preferences.unsubscribe_all_help": {
        "en": "Stops all marketing e-mail and withdraws every permission above.",
        "nl": "Stopt alle marketingmail en trekt alle toestemmingen hierboven in.",
    },
    "preferences.data_copy": {"en": "Your data", "nl": "Uw gegevens opvragen"},
    "preferences.data_copy_help": {
        "en": "Ask for a copy of the personal data we hold about you.",
        "nl": "Vraag een kopie op van de persoonsgegevens die wij van u hebben.",
    },
    "preferences.data_copy_button": {
        "en": "Send me a copy of my data",
        "nl": "Stuur mij een kopie van mijn gegevens",
    },
    "preferences.bad_name": {
        "en": "The name is too long or contains characters that are not allowed.",
        "nl": "De naam is te lang of bevat tekens die niet zijn toegestaan.",
    },
    # a copy of one's data (mailer.data_copy)
    "preferences.data_copy_sent": {
        "en": "We have received your request for a copy of your data. To make sure the copy "
        "goes to you, we have sent an e-mail with a confirmation link to {address}: open it and "
        "press the button. We answer within 30 days.",
        "nl": "Wij hebben uw verzoek om een kopie van uw gegevens ontvangen. Om zeker te weten "
        "dat de kopie bij u terechtkomt, hebben wij een e-mail met een bevestigingslink "
        "gestuurd naar {address}: open die en druk op de knop. Wij reageren binnen 30 dagen.",
    },
    "preferences.data_copy_recent": {
        "en": "We recently sent an e-mail with a confirmation link to {address}. Please use the "
        "link in it to get your copy; it is valid for 7 days.",
        "nl": "Wij hebben onlangs een e-mail met een bevestigingslink gestuurd naar {address}. "
        "Gebruik de link daarin om uw kopie te krijgen; die is 7 dagen geldig.",
    },
    "preferences.data_copy_not_sent": {
        "en": "We have received your request for a copy of your data, but could not send the "
        "confirmation e-mail just now. Please try again in a few minutes. We answer within "
        "30 days.",
        "nl": "Wij hebben uw verzoek om een kopie van uw gegevens ontvangen, maar konden de "
        "bevestigingsmail nu niet versturen. Probeer het over een paar minuten opnieuw. Wij "
        "reageren binnen 30 dagen.",
    },
    "data_copy.confirm.title": {
        "en": "Get a copy of your data",
        "nl": "Een kopie van uw gegevens",
    },
    "data_copy.confirm.intro": {
        "en": "You asked {sender} for a copy of the personal data we hold about {address}. "
        "Press the button to confirm that this is you; you can then download the copy.",
        "nl": "U heeft {sender} gevraagd om een kopie van de persoonsgegevens die wij van "
        "{address} hebben. Druk op de knop om te bevestigen dat u dit bent; daarna kunt u de "
        "kopie downloaden.",
    },
    "data_copy.confirm.button": {
        "en": "Confirm and get my copy",
        "nl": "Bevestigen en kopie ophalen",
    },
    "data_copy.confirm.ignore": {
        "en": "Did you not ask for this? Then ignore this page: without your confirmation "
        "nobody gets the copy.",
        "nl": "Heeft u hier niet om gevraagd? Negeer deze pagina dan: zonder uw bevestiging "
        "krijgt niemand de kopie.",
    },
    "data_copy.ready.title": {"en": "Your copy is ready", "nl": "Uw kopie staat klaar"},
    "data_copy.ready.body": {
        "en": "Thank you, that confirms it is you. Download the copy of your data below: a JSON "
        "file (about {size} kB), made at the moment you download it.",
        "nl": "Bedankt, daarmee is bevestigd dat u het bent. Download hieronder de kopie van uw "
        "gegevens: een JSON-bestand (ongeveer {size} kB), gemaakt op het moment dat u het "
        "downloadt.",
    },
    "data_copy.ready.link": {"en": "Download my data", "nl": "Mijn gegevens downloaden"},
    "data_copy.ready.expiry": {
        "en": "The download link works until {until}. We do not send it by e-mail, so save the "
        "file now. For a new link, use the confirmation link in our e-mail again.",
        "nl": "De downloadlink werkt tot {until}. Wij sturen hem niet per e-mail, dus sla het "
        "bestand nu op. Voor een nieuwe link gebruikt u de bevestigingslink in onze e-mail "
        "opnieuw.",
    },
    "data_copy.expired.title": {"en": "This link has expired", "nl": "Deze link is verlopen"},
    "data_copy.expired.body": {
        "en": "Links for a copy of your data are valid for 7 days. Nothing was shared. Ask "
        "again through the preferences link in any e-mail from us.",
        "nl": "Links voor een kopie van uw gegevens zijn 7 dagen geldig. Er is niets gedeeld. "
        "Vraag het opnieuw aan via de voorkeurenlink in een e-mail van ons.",
    },
    "data_copy.gone.title": {
        "en": "No data for this link",
        "nl": "Geen gegevens bij deze link",
    },
    "data_copy.gone.body": {
        "en": "We hold no data for this link: the request is unknown, or the data it was about "
        "has been erased. Nothing was shared.",
        "nl": "Wij hebben geen gegevens bij deze link: het verzoek is onbekend, of de gegevens "
        "waar het om ging zijn gewist. Er is niets gedeeld.",
    },
    "data_copy.closed.title": {"en": "This request is closed", "nl": "Dit verzoek is gesloten"},
    "data_copy.closed.body": {
        "en": "This request was already answered or closed another way. To ask again, use the "
        "preferences link in any e-mail from us.",
        "nl": "Dit verzoek is al beantwoord of op een andere manier afgesloten. Wilt u het "
        "opnieuw vragen, gebruik dan de voorkeurenlink in een e-mail van ons.",
    },
    "data_copy.mail.subject": {
        "en": "Confirm your request for a copy of your data at {sender}",
        "nl": "Bevestig uw verzoek om een kopie van uw gegevens bij {sender}",
    },
    "data_copy.mail.body": {
        "en": "Someone, hopefully you, asked {sender} for a copy of the personal data held "
        "about this e-mail address. To make sure the copy goes to the right person, open this "
        "link and press the button:",
        "nl": "Iemand, hopelijk u, heeft {sender} gevraagd om een kopie van de persoonsgegevens "
        "bij dit e-mailadres. Om zeker te weten dat de kopie bij de juiste persoon terechtkomt, "
        "opent u deze link en drukt u op de knop:",
    },
    "data_copy.mail.button": {"en": "Confirm my request", "nl": "Mijn verzoek bevestigen"},
    "data_copy.mail.expiry": {
        "en": "The link is valid for 7 days. We answer every request within 30 days.",
        "nl": "De link is 7 dagen geldig. Wij beantwoorden elk verzoek binnen 30 dagen.",
    },
    "data_copy.mail.ignore": {
        "en": "Did you not ask for this? Then ignore this e-mail: without your confirmation "
        "nobody gets a copy.",
        "nl": "Heeft u hier niet om gevraagd? Negeer deze e-mail dan: zonder uw bevestiging "
        "krijgt niemand een kopie.",
    },
    # purposes
    "purpose.marketing": {
        "en": "News and offers by e-mail",
        "nl": "Nieuws en aanbiedingen per e-mail",
    },
    "purpose.tracking": {
        "en": "Let you see whether I open your e-mails and click their links",
        "nl": "U laten zien of ik uw e-mails open en op links klik",
    },
    "purpose.other": {"en": "E-mail about: {name}", "nl": "E-mail over: {name}"},
    # the confirmation mail
    "mail.subject": {
        "en": "Please confirm your subscription to {sender}",
        "nl": "Bevestig uw aanmelding bij {sender}",
    },
    "mail.greeting": {"en": "Hello,", "nl": "Hallo,"},
    "mail.body": {
        "en": "Someone, hopefully you, asked {sender} to send e-mail to this address. "
        "Please confirm by opening this link and pressing the button:",
        "nl": "Iemand, hopelijk u, heeft {sender} gevraagd e-mail naar dit adres te sturen. "
        "Bevestig dit door deze link te openen en op de knop te drukken:",
    },
    "mail.button": {"en": "Confirm my subscription", "nl": "Mijn aanmelding bevestigen"},
    "mail.expiry": {
        "en": "The link is valid for 7 days.",
        "nl": "De link is 7 dagen geldig.",
    },
    "mail.ignore": {
        "en": "Did you not ask for this? Then ignore this e-mail: without your confirmation "
        "nothing happens and you will not hear from us again.",
        "nl": "Heeft u hier niet om gevraagd? Negeer deze e-mail dan: zonder uw bevestiging "
        "gebeurt er niets en hoort u niets meer van ons.",
    },
}


def negotiate(contact_locale: str | None, accept_language: str | None = None) -> Language:
    """The language for a person: their contact's locale, else Accept-Language, else English."""
    if contact_locale:
        chosen = _supported(contact_locale)
        if chosen is not None:
            return chosen
    for tag in accepted_languages(accept_language):
        chosen = _supported(tag)
        if chosen is not None:
            return chosen
    return DEFAULT_LANGUAGE


def accepted_languages(header: str | None) -> list[str]:
    """The language ranges of an Accept-Language header, most preferred first (q=0 dropped).

    Malformed entries are skipped, never an error: the header comes from anyone.
    """
    if not header or len(header) > MAX_ACCEPT_LANGUAGE:
        return []
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(header.split(",")):
        match = _RANGE.match(part)
        if match is None:
            continue
        try:
            quality = float(match.group(2)) if match.group(2) is not None else 1.0
        except ValueError:
            continue
        if not 0 < quality <= 1:
            continue
        ranked.append((-quality, position, match.group(1)))
    return [tag for _, _, tag in sorted(ranked)]


def language_or_none(raw: str | None) -> Language | None:
    """A supported language for a tag such as 'nl', 'nl-NL' or 'en_GB', or None."""
    return _supported(raw) if raw else None


def _supported(tag: str) -> Language | None:
    primary = re.split(r"[-_]", tag.strip(), maxsplit=1)[0].lower()
    return cast(Language, primary) if primary in LANGUAGES else None


class Translator:
    """`t("unsubscribe.title")` in one language; `{name}` fields are filled from keywords."""

    def __init__(self, language: Language) -> None:
        self.language = language

    def __call__(self, key: str, **values: object) -> str:
        text = MESSAGES[key][self.language]
        return text.format(**values) if values else text

    def purpose(self, purpose: str) -> str:
        """How a consent purpose is named to the person."""
        key = f"purpose.{purpose}"
        if key in MESSAGES:
            return self(key)
        return self("purpose.other", name=purpose.replace("-", " ").replace("_", " "))
