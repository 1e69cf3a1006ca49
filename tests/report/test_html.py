"""HTML building blocks: text from a run or a bundle is escaped for HTML and for the eye."""

from html.parser import HTMLParser

from relaylearn.report.html import escape, figure, image_panel


def test_escape_writes_markup_and_control_characters_as_visible_escapes():
    assert escape('Dom\x1b[2J<b>"x"</b>\nOK\r\u202e') == "Dom\\x1b[2J&lt;b&gt;&quot;x&quot;&lt;/b&gt;\\nOK\\r\\u202e"
    assert escape("Domain1 → Domain2 · ü") == "Domain1 → Domain2 · ü"  # printable text is kept as it is


class _CaptionParents(HTMLParser):
    """The element each <figcaption> sits in."""

    def __init__(self):
        super().__init__()
        self.open, self.parents = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "figcaption":
            self.parents.append(self.open[-1] if self.open else None)
        if tag != "img":
            self.open.append(tag)

    def handle_endtag(self, tag):
        self.open.pop()


def test_every_caption_belongs_to_a_figure():
    uri = "data:image/png;base64,AA=="
    parser = _CaptionParents()
    parser.feed(figure(uri, "a figure") + image_panel([("row", [(uri, "cell")])], caption="a panel") + image_panel([("row", [(uri, "")])]))
    assert parser.parents == ["figure", "figure"]
