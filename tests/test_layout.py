"""The layout shows the architecture: at the top level the five tutorial modules and the
scripts a user types, the machinery in one package, bench.py's measurements in another, the
tools typed once in tools/, and imports that run one way only."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = {"train", "lrfind", "model", "data", "schedule"}
SCRIPTS = {"train", "lrfind", "evaluate", "predict", "ablate", "compare", "bench", "report",
           "audit", "export"}
PACKAGES = ("machinery", "benchmarks", "tools")


def modules():
    """{module name: path} of the project: top-level modules and its packages' modules"""
    found = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(ROOT, "*.py"))}
    for package in PACKAGES:
        for f in glob.glob(os.path.join(ROOT, package, "*.py")):
            name = os.path.basename(f)[:-3]
            found[package if name == "__init__" else f"{package}.{name}"] = f
    return found


def imports(path, known):
    """The project modules a file imports, at its top or inside a function."""
    out = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}  # from machinery import ddp
    return {m for m in out if m in known}


def graph():
    mods = modules()
    return {m: imports(p, mods) - {m} for m, p in mods.items()}


def reach(deps, m):
    seen, todo = set(), [m]
    while todo:
        for d in deps[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


def test_the_top_level_holds_the_tutorial_and_the_scripts_alone():
    top = {m for m in modules() if "." not in m and m not in PACKAGES}
    assert top == TUTORIAL | SCRIPTS and len(top) <= 13
    assert all(os.path.isfile(os.path.join(ROOT, "machinery", f"{m}.py")) for m in (
        "config", "flags", "run", "epochs", "checkpoint", "datasets", "films", "hostmem", "devices",
        "ddp", "metrics", "plots", "report", "phantom", "audit", "covidx", "shortcuts",
        "runlock"))
    assert {m for m in modules() if m.startswith(("benchmarks.", "tools."))} == {
        "benchmarks.measure", "benchmarks.gpucheck", "tools.make_covidx_v1"}


def test_imports_run_one_way():
    deps = graph()
    # schedule.py and model.py sit under everything: they import nothing of the project
    assert deps["schedule"] == set() and deps["model"] == set()
    for m, ds in deps.items():
        if m.startswith(PACKAGES):  # the packages: never a script, nor data.py
            assert ds <= {d for d in deps if d.startswith(("machinery", m.split(".")[0]))} | {
                "model", "schedule"}, m
    runs = reach(deps, "train") | reach(deps, "lrfind")  # what a run imports: not these
    assert not {m for m in runs if m.startswith(("benchmarks", "tools"))}
    assert not any(d in SCRIPTS for d in reach(deps, "data"))  # data.py: the package only
    assert [m for m in deps if m in reach(deps, m)] == []  # no circle, however long
    # nothing imports a script but the scripts that drive it (bench.py runs train.main;
    # evaluate.py loads its model with predict.Classifier, the Python API)
    users = {s: {m for m, ds in deps.items() if s in ds} for s in SCRIPTS}
    assert users["train"] <= {"bench"} and users["lrfind"] == {"train"}
    assert users["compare"] == {"ablate"} and users["predict"] == {"evaluate"} and all(
        not users[s] for s in ("evaluate", "ablate", "bench", "report", "audit", "export"))
    assert {m for m, ds in deps.items() if any(d.startswith("benchmarks") for d in ds)} <= {
        "bench", "benchmarks.gpucheck"}


def test_every_file_says_what_it_teaches_or_holds():
    for m, path in modules().items():
        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert doc and len(doc) > 80, f"{m}: no docstring"
        if m in TUTORIAL:
            assert "What it teaches" in doc, m
        assert max(len(line) for line in open(path).read().splitlines()) <= 100, m
