"""Regenerate the README's configuration reference from the config schema."""

from pathlib import Path

from relaylearn.config import config_reference_markdown

readme = Path(__file__).resolve().parent.parent / "README.md"
start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
text = readme.read_text()
head, rest = text.split(start, 1)
tail = rest.split(end, 1)[1]
readme.write_text(head + start + config_reference_markdown() + end + tail)
print(f"updated {readme}")
