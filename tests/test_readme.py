"""The README's configuration reference is generated from the schema and must be current."""

from pathlib import Path

from relaylearn.config import config_reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def test_config_reference_is_current():
    text = README.read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    assert block == config_reference_markdown(), "README config reference is stale: run `python tools/update_readme.py`"


def test_readme_starts_with_the_two_setup_commands():
    head = README.read_text()[:1500]
    assert "make demo" in head and "make test" in head
