"""The README and docs/: the configuration reference is current, and the commands they show are ones the CLI accepts."""

from pathlib import Path

import pytest

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


def _documented_commands():
    """(file:line, argv) of every concrete ``relaylearn ...`` line in the fenced code blocks of the
    README and docs/ (continuation lines joined; synopses with ``[...]``, ``<...>``, ``|`` or ``...``
    placeholders left out)."""
    import re
    import shlex

    found = []
    for path in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        lines, inside, i = path.read_text().splitlines(), False, 0
        while i < len(lines):
            line, start = lines[i], i
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                match = re.match(r"\s*(?:\.venv/bin/)?relaylearn\s+(.*)", line)
                if match:
                    command = re.sub(r"\s+#.*", "", match.group(1)).strip()
                    if not any(t in command for t in ("[", "<", "|", "...", "$")):
                        found.append((f"{path.name}:{start + 1}", shlex.split(command)))
            i += 1
    return found


DOCUMENTED = _documented_commands()


def test_the_docs_hold_commands_to_check():
    assert len(DOCUMENTED) >= 40


@pytest.mark.parametrize("where,argv", DOCUMENTED, ids=[w for w, _ in DOCUMENTED])
def test_documented_command_parses_and_names_how_to_trust_its_bundle(where, argv):
    """Each command as written is accepted by the parser, and one that reads a bundle for use
    (test --bundle, predict, export, audit) says how: --trust DIR or --no-verify (without either
    the command stops with exit 2)."""
    from relaylearn.cli import build_parser

    args = build_parser().parse_args(argv)
    reads_bundle = args.command in ("predict", "export", "audit") or (args.command == "test" and args.bundle)
    if reads_bundle:
        assert args.trust or args.no_verify, f"{where}: `relaylearn {' '.join(argv)}` needs --trust DIR or --no-verify"
