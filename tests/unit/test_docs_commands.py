"""The commands in README.md, CONTRIBUTING.md and docs/ cannot rot.

Every `raybench ...` (and `python jobs/<command>.py ...`) line in a shell code block is parsed
by the real command line, and its configs are validated as the command would before starting
anything: the run config with its `--set`s, a sweep's space, the serve config. Nothing trains
and no Ray starts. Commands quoted inline (`raybench eval --config F --model DIR`) may use
placeholders; their subcommand and every option they name must exist. Relative links must
point at files that exist, and the README keeps the test command CI reads.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from raybench.cli import build_parser
from raybench.config import load_config, load_raw
from raybench.serve.config import load_serve_config
from raybench.tune.space import validate_space

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|", "&"}
# What .ci/run executes: the first line after the marker that is not a fence.
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-cpu.txt -e ".[test]" && pytest -q'


def shell_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in SHELL]


def logical_lines(block: str) -> list[str]:
    """Shell lines: backslash continuations joined, and a quote left open continues the line."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # no closing quotation yet
            continue
        lines.append(pending)
        pending = ""
    return lines + ([pending] if pending else [])


def commands(block: str) -> list[list[str]]:
    """The argv after `raybench` of every raybench command in a shell block (`python
    jobs/train.py ...` is `raybench train ...`: the job entrypoints call the same main)."""
    found = []
    for line in logical_lines(block):
        lex = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lex.whitespace_split, lex.commenters = True, "#"
        segment: list[str] = []
        for token in [*lex, "&&"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            words = [w for w in segment if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)] if segment else []
            if words[:1] == ["raybench"]:
                found.append(words[1:])
            elif words[:1] == ["python"] and len(words) > 1 and re.fullmatch(r"jobs/\w+\.py", words[1]):
                found.append([Path(words[1]).stem, *words[2:]])
            segment = []
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(page.name, argv) for page in PAGES for block in shell_blocks(page.read_text())
            for argv in commands(block)]


def parse(argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"raybench {shlex.join(argv)}: does not parse:\n{err.getvalue()}")


def validate(args: argparse.Namespace) -> None:
    """What the command itself checks before it starts Ray or loads torch."""
    if args.command == "deploy":
        load_serve_config(args.config, args.overrides, model=args.checkpoint or args.model)
        return
    if not hasattr(args, "overrides") or getattr(args, "resume", None):
        return  # no run config (ask, probe, bench), or a sweep resumed with the config it started with
    cfg = load_config(args.config, args.overrides)
    if args.command in ("sweep", "pipeline"):
        assert cfg.sweep.space, f"{args.config}: a sweep needs sweep.space"
        validate_space(load_raw(args.config, args.overrides), cfg)
    if args.command == "pipeline":
        load_serve_config(args.serve_config, args.serve_overrides)


@pytest.mark.parametrize("page,argv", documented_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_documented_command_parses_and_validates(page, argv, monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repository root
    validate(parse(argv))


def test_the_start_here_commands_are_found():
    """The extractor sees the README's main job (a broken fence regex would pass everything)."""
    readme = [argv for page, argv in documented_commands() if page == "README.md"]
    assert ["pipeline", "--config", "jobs/configs/default.yaml"] in readme


def test_a_rotten_command_fails():
    block = "raybench train --config jobs/configs/smoke.yaml --set train.stepz=3  # typo\n"
    [argv] = commands(block)
    with pytest.raises(Exception, match="stepz"):
        validate(parse(argv))
    with pytest.raises(pytest.fail.Exception):
        parse(["train", "--no-such-flag"])


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of `raybench <words...>`: follows subcommands as far as the words name them."""
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def inline_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        out += [(page.name, span) for span in dict.fromkeys(re.findall(r"`(raybench [^`]+)`", prose))]
    return out


@pytest.mark.parametrize("page,span", inline_commands(), ids=lambda x: " ".join(x.split()))
def test_inline_command_names_a_real_subcommand_and_options(page, span):
    words = span.split()[1:]
    top = build_parser()
    sub = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert words and words[0] in sub.choices, f"{page}: `{span}`: no subcommand {words[:1]}"
    parser = _subparser(top, words)
    options = [re.sub(r"[\[\]]|=.*", "", w) for w in words if w.lstrip("[").startswith("--")]
    unknown = [o for o in options if o not in parser._option_string_actions]
    assert unknown == [], f"{page}: `{span}`: {parser.prog} has no option {unknown}"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as '-'."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_at_files_and_headings():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]*))?\)", FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path = page.parent / target if target else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor}")
    assert broken == []


def test_the_readme_keeps_the_test_command_ci_runs():
    lines = (REPO / "README.md").read_text().split("<!-- test-command -->", 1)[1].splitlines()
    first = next(line for line in lines if line.strip() and not line.startswith("```"))
    assert first == TEST_COMMAND
