"""The README and docs/ against the code: every `hm3 COMMAND --flag` they show is a flag of that
command's real parser, and every recipe they show parses (so docs cannot drift from the code)."""

import re
from pathlib import Path

import pytest
import yaml

from hm3.cli import build_parser
from hm3.recipe import parse_recipe, top_level_keys

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(hm3 [^`]+)`")
# `hm3 COMMAND`, also as `.venv/bin/hm3 COMMAND`, not `hm3.serve` or `hm3[serve]`
COMMAND = re.compile(r"(?:^|[\s/(])hm3 ([a-z][a-z-]*)")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
HEREDOC = re.compile(r"<<'?EOF'?\n(.*?)^EOF$", re.S | re.M)


def blocks(kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(where, text) of each fenced block of one of `kinds` in the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) in kinds:
                line = text[:match.start()].count("\n") + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def command_lines() -> list[tuple[str, str]]:
    """Every shell line (continuations joined, comments and heredoc bodies dropped) and every
    inline `hm3 ...` span of the README and docs/."""
    lines = []
    for where, body in blocks(("bash", "sh", "console", "")):
        body = HEREDOC.sub("\n", body).replace("\\\n", " ")
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            for segment in re.split(r"\||&&|;", line):
                lines.append((where, segment))
    for page in PAGES:
        for match in INLINE.finditer(page.read_text(encoding="utf-8")):
            lines.append((str(page.relative_to(ROOT)), match.group(1)))
    return lines


def subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.choices and "merge" in a.choices)
    return action.choices


def test_the_docs_show_commands():
    shown = {m.group(1) for _, line in command_lines() for m in COMMAND.finditer(line)}
    assert {"merge", "predict", "check", "serve", "export", "search"} <= shown


def test_every_documented_flag_exists():
    parsers = subparsers()
    wrong = []
    for where, line in command_lines():
        matches = list(COMMAND.finditer(line))
        for index, match in enumerate(matches):
            command = match.group(1)
            if command not in parsers:
                wrong.append(f"{where}: `hm3 {command}`: no such command")
                continue
            end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
            known = {option for action in parsers[command]._actions
                     for option in action.option_strings}
            for flag in FLAG.findall(line[match.end():end]):
                if flag not in known:
                    wrong.append(f"{where}: `hm3 {command} {flag}`: no such flag")
    assert not wrong, "\n".join(wrong)


def yaml_blocks() -> list[tuple[str, object]]:
    found = [(where, yaml.safe_load(body)) for where, body in blocks(("yaml", "yml"))]
    # recipes written by a shell heredoc, their $VARIABLES standing for paths
    for where, body in blocks(("bash", "sh")):
        for match in HEREDOC.finditer(body):
            found.append((where, yaml.safe_load(re.sub(r"\$\{?\w+\}?", "/x", match.group(1)))))
    return found


def test_yaml_examples_are_read():
    assert any(isinstance(data, dict) and "base" in data for _, data in yaml_blocks())


@pytest.mark.parametrize("where,data", [pytest.param(w, d, id=w) for w, d in yaml_blocks()])
def test_recipe_examples_parse(where, data):
    """A block with `base` (or mergekit's `base_model`) is a full recipe: it must parse (paths
    are not opened by parsing). A block that uses some recipe keys is a recipe's fragment: every
    key must be a recipe key. Others (a policy file, a gateway's config) are not recipes."""
    if not isinstance(data, dict):
        return
    if "base" in data or "base_model" in data:
        parse_recipe(data)
    elif set(data) & top_level_keys():
        keys = top_level_keys()
        assert set(data) <= keys, f"{where}: unknown recipe keys {set(data) - keys}"
