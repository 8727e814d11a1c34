"""URL checks and redaction (casstore/urls.py)."""

from __future__ import annotations

import random

import pytest

from casstore import urls
from casstore.errors import InvalidInput


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@host/x.whl", "https://***@host/x.whl"),
        (
            "https://conda.anaconda.org/t/tok-123/chan/x.conda",
            "https://conda.anaconda.org/t/***/chan/x.conda",
        ),
        ("https://host/x?token=abc&v=1", "https://host/x?token=***&v=1"),
        ("https://host/pkg/t/x.whl", "https://host/pkg/t/x.whl"),
        ("http://127.0.0.1:8080/s/1.bin", "http://127.0.0.1:8080/s/1.bin"),
    ],
)
def test_secrets_are_redacted(url, shown):
    assert urls.redact(url) == shown


def test_plain_urls_take_a_short_cut_to_the_same_answers(monkeypatch):
    """A plain http(s) URL skips urlsplit in ``redact`` and ``check_url``: for
    random URLs, the answers with and without the short cut are the same."""
    rng = random.Random(11)
    chars = [chr(c) for c in range(32, 127)] + ["é", "\t"]
    made = []
    for _ in range(20_000):
        rest = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.5:
            rest = rng.choice(["127.0.0.1:8080", "h", "a.b", "H:99999", ""]) + "/" + rest
        made.append(rng.choice(["http://", "https://", "file://", "HTTP://", "ftp://", ""]) + rest)

    def answers() -> list[tuple[str, str]]:
        out = []
        for url in made:
            try:
                checked = urls.check_url(url)
            except InvalidInput as exc:
                checked = f"invalid: {exc}"
            out.append((urls.redact.__wrapped__(url), checked))
        return out

    fast = answers()
    assert sum(urls._plain(url) for url in made) > 2_000
    monkeypatch.setattr(urls, "_plain", lambda url: False)
    assert answers() == fast
