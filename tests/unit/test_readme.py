"""Every command the README shows parses with the installed anomalib and the plugin's own CLI.

Commands come from the README's ``bash`` blocks (continuation lines joined, comments dropped, a leading
``VAR=value`` stripped) and from its inline code spans that start with ``anomalib``, hold an option and
no ``...`` or ``|`` placeholder (``<name>`` placeholders get a dummy value). anomalib's subcommands are
parsed with ``--print_config`` (anomalib's parser checks every option and class name, nothing runs); the plugin's
``bank`` / ``predict-ov`` / ``demo`` are parsed by its own parser. The two set-up commands (they create a
virtual environment and install) are not run: the test checks they are there.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from anomalib_cgad.cli import ANOMALIB_SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETUP = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e ")


def readme_commands(text: str) -> list[str]:
    """The shell commands of ``text``'s bash blocks and runnable inline spans, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                commands.append(" ".join(line.split()))
    for span in re.findall(r"`(anomalib(?:-cgad)? [^`]+)`", text):
        if "--" in span and "..." not in span and "|" not in span:  # a command, not a mention
            commands.append(re.sub(r"<[^>]+>", "x", span))
    return commands


COMMANDS = readme_commands(README)
RUNNABLE = [command for command in COMMANDS if not SETUP.match(command)]


def test_readme_shows_the_two_setup_commands() -> None:
    setup = [command for command in COMMANDS if SETUP.match(command)]
    assert setup == [
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[elpv]" && anomalib-cgad demo',
        'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[elpv,dev]" && ruff check . && pytest',
    ]
    assert len(RUNNABLE) >= 10  # the README's other commands were found


def _parse_anomalib(argv: list[str]) -> tuple[int, str]:
    from anomalib.cli.cli import AnomalibCLI

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        AnomalibCLI(args=[*argv, "--print_config"])
    return done.value.code or 0, err.getvalue()


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_parses(command: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the README's paths (configs/...) are relative to the repository
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    program, argv = words[0], words[1:]
    assert program in {"anomalib", "anomalib-cgad"}, command
    if program == "anomalib" or argv[0] in ANOMALIB_SUBCOMMANDS:
        code, errors = _parse_anomalib(argv)
        assert code == 0, f"{command}\n{errors[-2000:]}"
    else:
        args = build_parser().parse_args(argv)
        assert args.func is not None


def test_the_old_predict_spelling_is_refused_by_anomalib() -> None:
    """The README used ``--data_path``, which anomalib 2.7 does not take: the parse check catches such a line."""
    code, errors = _parse_anomalib(shlex.split("predict --model CGAD --ckpt_path x --data_path images/"))
    assert code != 0
    assert "--data_path" in errors
