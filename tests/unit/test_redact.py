import pytest

from edge.config import EdgeConfig
from edge.redact import DEFAULT_PATTERNS, Redactor
from tandem.contract import TEXT_MAX_BYTES
from tandem.settings import ConfigError, load_config

redact = Redactor(DEFAULT_PATTERNS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my card 4111 1111 1111 1111 was charged twice", "my card [CARD] was charged twice"),
        ("card 4111-1111-1111-1111 declined", "card [CARD] declined"),
        ("pan 5500000000000004", "pan [CARD]"),
        ("amex 3782 822463 10005 blocked", "amex [CARD] blocked"),
        ("nineteen digits 6011000990139424123", "nineteen digits [CARD]"),
    ],
)
def test_card_numbers_with_spaces_or_dashes_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe+bank@mail.example.co.uk please", "mail [EMAIL] please"),
        ("Contact: A_B@x-y.io.", "Contact: [EMAIL]."),
    ],
)
def test_email_addresses_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "phone", ["+44 20 7946 0958", "(555) 123-4567", "555-123-4567", "555.123.4567", "+4915112345678", "07700 900123"]
)
def test_phone_numbers_in_common_formats_are_redacted(phone: str) -> None:
    assert redact(f"call me on {phone} today") == "call me on [PHONE] today"


@pytest.mark.parametrize(
    "text",
    [
        "I was charged 20 twice in 2019",
        "my card ending 1234 arrived on 12/05",
        "a transfer of 1,500.00 EUR is pending",
        "top up 100 200",
        "what is the exchange rate?",
    ],
)
def test_text_without_pii_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_several_kinds_in_one_text() -> None:
    text = "I'm a@b.com, +1 415 555 0100, card 4111 1111 1111 1111"
    assert redact(text) == "I'm [EMAIL], [PHONE], card [CARD]"


def test_custom_patterns_replace_the_defaults_and_name_the_replacement(tmp_path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\nredaction: {iban: 'GB\\d{2}[A-Z]{4}\\d{14}'}\n")
    cfg = load_config(EdgeConfig, path)
    custom = Redactor(cfg.redaction)
    assert custom("send to GB29NWBK60161331926819 now") == "send to [IBAN] now"
    assert custom("a@b.com") == "a@b.com", "only the configured patterns apply"


def test_an_invalid_pattern_is_refused_at_start_naming_it(tmp_path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\nredaction: {broken: '[0-9'}\n")
    with pytest.raises(ConfigError, match=r"redaction(.|\n)*'broken' is not a valid regex"):
        load_config(EdgeConfig, path)


def test_a_redacted_text_never_outgrows_the_limit() -> None:
    pad = "x" * (TEXT_MAX_BYTES - 20)
    text = pad + "é mail a@b.co now!!"  # at the limit; "[EMAIL]" is one byte longer than "a@b.co"
    assert len(text.encode()) == TEXT_MAX_BYTES
    assert redact(text) == pad + "é mail [EMAIL] now!"
    long = "é" * (TEXT_MAX_BYTES // 2 + 1)  # 2 bytes over: clipped at a character boundary, not inside one
    assert redact(long) == "é" * (TEXT_MAX_BYTES // 2)
