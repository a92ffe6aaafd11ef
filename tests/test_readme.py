"""The README's commands keep working: every command line in its shell code blocks names a script, make target and
options that exist, every file it links to exists, and it stays at most 150 lines.

A command line is checked for what can be checked without the user's data: `make T` needs a rule for T in the
Makefile, and the Python lines of that rule (and of the rules it makes) are checked as below; `python S.py ARGS` needs S.py, and every option in ARGS must be listed by `python S.py [SUBCOMMAND]
--help`; `sbatch`/`bash X.sh ARGS` needs X.sh, and the options after it must be accepted by X.py (the script the
batch file runs; `-r`/`--reservation` are the batch file's own); repository paths named in ARGS (recipes/, models/)
must exist. train.py lines are run as written with `--print_config` added (the recipe and options resolve; no data
is read). Running the commands themselves is covered elsewhere: make demo's steps by test_pipeline.py and
test_patches.py (training, fine-tuning, inference, scoring on tiny data), the sbatch lines by test_slurm.py.
"""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# batch files whose arguments go to the Python script of the same name; the options they take off first
BATCH_OWN_OPTIONS = {"-r", "--reservation"}
BATCH_ARGS_ARE_SBATCH_OPTIONS = {"submit_chain.sh"}
REPO_PATH = re.compile(r"^(recipes|models)/\S+$")


def shell_blocks(text: str):
    """(first line number, lines) of every fenced code block whose language is a shell."""
    blocks, current, language, start = [], None, None, 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and current is None:
            current, language, start = [], fence.group(1).lower(), number + 1
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_commands(path: str = README):
    """(README line number, command text, tokens) of every command line in the README's shell blocks; backslash
    continuations joined, comments dropped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    commands = []
    for start, lines in shell_blocks(text):
        pending, first = "", None
        for offset, line in enumerate(lines):
            if first is None:
                first = start + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            tokens = shlex.split(command, comments=True)
            if tokens:
                commands.append((first, shlex.join(tokens), tokens))
            pending, first = "", None
    return commands


def options_in(args):
    """The options named in a command's arguments: `--name` of `--name=value` and of `[--name V]`, short `-x`."""
    options = []
    for token in args:
        token = token.strip("[]|")
        if re.match(r"^--?[A-Za-z]", token):
            options.append(token.split("=", 1)[0])
    return options


def positional_prefix(args):
    """The first argument when it is not an option (a subcommand such as `pictures.py lineage`, or an input file)."""
    return args[:1] if args and not args[0].startswith("-") else []


@functools.lru_cache(maxsize=None)
def help_options(script: str, prefix: tuple) -> frozenset:
    """The options `python script [prefix] --help` lists."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script, *prefix, "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"python {script} {' '.join(prefix)} --help failed:\n{result.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))


def makefile() -> str:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        return f.read()


def make_targets() -> set:
    return {m.group(1) for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", makefile(), re.M)}


SHELL_SEPARATORS = {"&&", "||", ";", "|", "if", "then", "else", "fi", "do", "done"}


def make_rule_commands(target: str):
    """The commands of a Makefile rule, its variables expanded ($(PY) -> .venv/bin/python), split at the shell's
    separators: lists of tokens."""
    text = makefile()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=[ \t]*(.*)$", text, re.M))
    variables["MAKE"] = "make"
    body = re.search(rf"^{re.escape(target)}\s*:[^\n]*\n((?:\t[^\n]*\n?)*)", text, re.M)
    commands = []
    for line in (body.group(1) if body else "").replace("\\\n", " ").splitlines():
        line = line.strip().lstrip("@")
        if line.startswith("#"):
            continue
        for _ in range(5):  # nested variables: PY -> $(VENV)/bin/python
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command = []
        for token in list(lexer) + [";"]:
            if token in SHELL_SEPARATORS:
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def check_make(targets, line, seen=None):
    """Every target has a rule, and every Python script its rule runs accepts the options it is given."""
    seen = set() if seen is None else seen
    missing = [t for t in targets if t not in make_targets()]
    assert targets and not missing, f"README line {line}: no make target {missing or '(none named)'}"
    for target in targets:
        if target in seen:
            continue
        seen.add(target)
        for command in make_rule_commands(target):
            if os.path.basename(command[0]).startswith("python") and len(command) > 1 and command[1].endswith(".py"):
                check_python(command[1], command[2:], f"{line} (make {target})")
            elif command[0] == "make":
                check_make([a for a in command[1:] if not a.startswith("-") and "=" not in a], line, seen)


def check_python(script, args, line):
    assert os.path.isfile(os.path.join(ROOT, script)), f"README line {line}: {script} does not exist"
    accepted = help_options(script, tuple(positional_prefix(args)))
    unknown = [o for o in options_in(args) if o not in accepted]
    assert not unknown, f"README line {line}: {script} does not accept {unknown}"
    check_paths(args, line)


def check_batch(args, line):
    """`sbatch [sbatch options] X.sh ARGS` or `bash X.sh ARGS`."""
    scripts = [i for i, a in enumerate(args) if a.endswith(".sh")]
    assert scripts, f"README line {line}: no batch file named"
    batch = args[scripts[0]]
    assert os.path.isfile(os.path.join(ROOT, batch)), f"README line {line}: {batch} does not exist"
    rest = args[scripts[0] + 1:]
    if batch in BATCH_ARGS_ARE_SBATCH_OPTIONS:
        return
    target = batch[:-3] + ".py"
    assert os.path.isfile(os.path.join(ROOT, target)), f"README line {line}: {batch} runs no {target}"
    accepted = help_options(target, ())
    unknown = [o for o in options_in(rest) if o not in accepted and o not in BATCH_OWN_OPTIONS]
    assert not unknown, f"README line {line}: {target} (run by {batch}) does not accept {unknown}"
    check_paths(rest, line)


def check_paths(args, line):
    for token in args:
        if REPO_PATH.match(token):
            assert os.path.exists(os.path.join(ROOT, token)), f"README line {line}: {token} does not exist"


COMMANDS = readme_commands()


def test_the_readme_has_command_lines():
    assert len(COMMANDS) >= 5, COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("line,command,tokens", COMMANDS, ids=[f"line{c[0]}" for c in COMMANDS])
def test_readme_command_line(line, command, tokens):
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    program, args = tokens[0], tokens[1:]
    if program == "make":
        check_make([a for a in args if not a.startswith("-") and "=" not in a], line)
    elif os.path.basename(program).startswith("python"):
        assert args and args[0].endswith(".py"), f"README line {line}: python runs no script: {command}"
        check_python(args[0], args[1:], line)
        if args[0] == "train.py":  # the options and the recipe resolve: run as written (+ --print_config: no data)
            extra = [] if "--print_config" in args else ["--print_config"]
            result = subprocess.run([sys.executable, *args, *extra], cwd=ROOT, capture_output=True, text=True,
                                    timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert result.returncode == 0 and "view:" in result.stdout, \
                f"README line {line}: {shlex.join(args + extra)}: {result.stderr[-2000:]}"
    elif program in ("sbatch", "bash"):
        check_batch(args, line)
    else:
        pytest.fail(f"README line {line}: tests/test_readme.py does not know how to check {program!r}: {command}")


def test_readme_links_pictures_and_requirements_files_exist():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r"requirements[\w-]*\.txt", text)
    missing = [t for t in targets if "://" not in t and not os.path.exists(os.path.join(ROOT, t))]
    assert targets and not missing, f"README links to files that do not exist: {missing}"


def test_readme_is_at_most_150_lines():
    with open(README, encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 150


def test_make_rule_commands_of_the_demo():
    commands = make_rule_commands("demo")
    scripts = {c[1] for c in commands if os.path.basename(c[0]).startswith("python") and len(c) > 1}
    assert {"simulate.py", "train.py", "inference.py", "eval.py"} <= scripts, commands
    assert all("$(" not in token for command in commands for token in command), commands


def test_the_command_parser_on_a_known_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("text\n```bash\nmake demo    # a comment\nDATA=x bash train.sh \\\n    --num_epochs 2\n```\n"
                      "```text\npython not_a_command.py\n```\n", encoding="utf-8")
    assert readme_commands(str(readme)) == [
        (3, "make demo", ["make", "demo"]),
        (4, "DATA=x bash train.sh --num_epochs 2", ["DATA=x", "bash", "train.sh", "--num_epochs", "2"])]
    assert options_in(["movie.nd2", "[--channel", "C]", "--reservation=aihero-gpu", "-r", "x"]) == [
        "--channel", "--reservation", "-r"]
