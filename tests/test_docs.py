"""The docs against the code: every `python ...` and `torchrun ...` command in README.md and
docs/*.md names a script that exists, and that script's parser accepts every flag it is
given (parsed only, nothing run). A renamed flag fails here, not in a reader's terminal. And
every script's --help in train.py's form."""
import contextlib
import glob
import importlib
import io
import os
import re
import shlex

import pytest

import ablate
from machinery import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "BENCHMARKS.md", "FIDELITY.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}  # where a command ends


def commands(text):
    """The argv of each python / python3 / torchrun command in the text's code: fenced blocks
    (backslash continuations joined, # comments dropped) and `inline` code."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split(" #")[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`([^`\n]+)`", prose)
    out = []
    for line in found:
        m = re.search(r"(?:^|\s)((?:python3?|torchrun)\s.*)", line)
        if not m:
            continue
        try:
            argv = shlex.split(m.group(1))
        except ValueError:  # an unbalanced quote in prose: not a command
            continue
        cut = next((i for i, a in enumerate(argv) if a in SHELL), len(argv))
        out.append(argv[:cut])
    return out


def script_and_args(argv):
    """(script path, its arguments), or None for `python -m ...`, `python -c` and the like."""
    rest = argv[1:]
    if argv[0] == "torchrun":  # torchrun's own options come before the script
        while rest and rest[0].startswith("-"):
            rest = rest[1:] if "=" in rest[0] or rest[0] == "--standalone" else rest[2:]
    if not rest or not rest[0].endswith(".py"):
        return None
    return rest[0], rest[1:]


def parser_of(script):
    if script == "train.py":
        return config.make_parser()
    return importlib.import_module(script[:-3].replace("/", ".")).make_parser()


def parses(parser, args, known=False):
    """None when the parser accepts args (--help included), else what it said. Abbreviations
    are refused: a flag renamed to a longer name must not pass as a prefix of it."""
    parser.allow_abbrev = False
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if known:
                return parser.parse_known_args(args)[1]
            parser.parse_args(args)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


ALL = [(doc, argv) for doc in DOCS for argv in commands(open(os.path.join(ROOT, doc)).read())]


def test_the_docs_hold_commands_to_check():
    scripts = {script_and_args(a)[0] for _, a in ALL if script_and_args(a)}
    assert {"train.py", "evaluate.py", "predict.py", "lrfind.py", "bench.py"} <= scripts
    assert any(a[0] == "torchrun" for _, a in ALL)


@pytest.mark.parametrize("doc,argv", ALL, ids=[f"{d}: {' '.join(a)[:60]}" for d, a in ALL])
def test_every_documented_command_parses(doc, argv):
    found = script_and_args(argv)
    if found is None:
        return
    script, args = found
    assert os.path.isfile(os.path.join(ROOT, script)), f"{doc}: no script {script}"
    if script == "ablate.py":  # what ablate.py does not know goes to train.py
        rest = parses(parser_of(script), args, known=True)
        why = None if isinstance(rest, list) and parses(config.make_parser(), rest) is None \
            else f"train.py does not take {rest}"
    else:
        why = parses(parser_of(script), args)
    assert why is None, f"{doc}: `{' '.join(argv)}`: {why}"


def test_a_renamed_flag_is_caught():
    assert parses(config.make_parser(), ["--data", "x", "--stages", "64"]) is None
    assert parses(config.make_parser(), ["--data", "x", "--stage", "64"]) is not None
    assert commands("run `python train.py --demo` or\n```bash\npython evaluate.py runs/A \\\n"
                    "  --tta v1   # comment\n```\n") == [  # the blocks', then the inline ones
        ["python", "evaluate.py", "runs/A", "--tta", "v1"], ["python", "train.py", "--demo"]]
    assert script_and_args(["torchrun", "--nproc_per_node=8", "--nnodes", "2", "train.py",
                            "--demo"]) == ("train.py", ["--demo"])


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_docs_leads_somewhere():
    bad = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path \
                else os.path.join(ROOT, doc)
            if not os.path.exists(file):
                bad.append(f"{doc}: {target} (no such file)")
            elif anchor and file.endswith(".md"):
                heads = [slug(h) for h in re.findall(r"^#+ (.*)$", open(file).read(), re.M)]
                if anchor not in heads:
                    bad.append(f"{doc}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_every_test_the_docs_name_exists():
    """FIDELITY.md pins each element of the recipe to a test: that test must exist."""
    missing = []
    for doc in DOCS:
        for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)",
                                     open(os.path.join(ROOT, doc)).read()):
            path = os.path.join(ROOT, "tests", file)
            if not (os.path.isfile(path) and re.search(rf"^def {name}\(", open(path).read(),
                                                       re.M)):
                missing.append(f"{doc}: {file}::{name}")
    assert not missing, "\n".join(missing)


SCRIPTS = ["train.py", "lrfind.py", "evaluate.py", "predict.py", "export.py", "ablate.py",
           "compare.py", "report.py", "audit.py", "tools/make_covidx_v1.py", "bench.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_scripts_help_reads_as_train_pys(script):
    """The usage line says what to give, each flag that takes a value names what (no
    TRAIN_SPLIT placeholders), every flag has a help text with its default said once at most,
    and a required one says so."""
    p = parser_of(script)
    assert p.usage and p.usage.startswith("%(prog)s") and "[-h]" not in p.format_usage()
    for a in p._actions:
        name = (a.option_strings or [a.dest])[0]
        if name == "-h":
            continue
        assert a.help, f"{script} {name}: no help"
        shown = p.formatter_class(p.prog)._get_help_string(a) if a.help != "==SUPPRESS==" else ""
        # "(default: x)" or "(...; default: x)", argparse's %(default)s filled in
        said = re.findall(r"[(;] ?default", shown.replace("%(default)s", "x"))
        assert len(said) <= 1, f"{script} {name}: its default said twice"
        if a.option_strings and a.nargs != 0:
            assert a.metavar or a.choices, f"{script} {name}: no metavar"
        if a.required and a.option_strings:
            assert "(required" in a.help, f"{script} {name}: required, and not said"
    if script == "ablate.py":  # its variants, with what each changes
        assert all(f"  {name:<18} " in p.epilog for name in ablate.VARIANTS)


def test_the_readme_says_the_tutorials_size_as_it_is():
    files = ["train.py", "lrfind.py", "schedule.py", "model.py", "data.py"]
    lines = sum(len(open(os.path.join(ROOT, f)).read().splitlines()) for f in files)
    said = re.search(r"Five files hold the recipe, ([\d,]+) lines in all",
                     " ".join(open(os.path.join(ROOT, "README.md")).read().split()))
    assert said and int(said.group(1).replace(",", "")) == lines
