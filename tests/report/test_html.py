"""HTML building blocks: text from a run or a bundle is escaped for HTML and for the eye."""

from relaylearn.report.html import escape


def test_escape_writes_markup_and_control_characters_as_visible_escapes():
    assert escape('Dom\x1b[2J<b>"x"</b>\nOK\r\u202e') == "Dom\\x1b[2J&lt;b&gt;&quot;x&quot;&lt;/b&gt;\\nOK\\r\\u202e"
    assert escape("Domain1 → Domain2 · ü") == "Domain1 → Domain2 · ü"  # printable text is kept as it is
