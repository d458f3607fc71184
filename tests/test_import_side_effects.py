"""Importing kangaroo_lit changes no process-wide state: no warnings filter, no environment variable.

A library that sets ``HF_HUB_OFFLINE`` or silences warnings when it is imported changes the behaviour of
the program that imports it; such settings belong in the entry points (``kangaroo-lit``, scripts) or in
a ``warnings.catch_warnings`` block around the call that warns.

The imports run in a fresh interpreter whose environment lacks the variables the tests set
(``HF_HUB_OFFLINE`` and the like). torch, Lightning and other dependencies do add warnings filters and
environment variables when imported (torch, for example, sets ``TORCHINDUCTOR_CACHE_DIR``); those are
not this package's to fix. So a first interpreter imports the package and lists every other module that
this loaded; a second imports those modules first, takes its snapshot, then imports the package: any
change left is made by kangaroo_lit's own import-time code.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Variables the test suite (conftest.py) or CI (.ci/run) set, which an import must not set either.
UNSET = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")

# Runs in the child interpreters; argv[1] is "probe" or "check", argv[2] (check) a JSON list of modules.
CHILD = r'''
import importlib, json, os, pkgutil, sys, traceback, warnings

MODULES = ["kangaroo_lit", "kangaroo_lit.model", "kangaroo_lit.lit_module", "kangaroo_lit.callbacks",
           "kangaroo_lit.cli", "kangaroo_lit.data", "kangaroo_lit.decoding", "kangaroo_lit.artifact"]
BENCH = ["kangaroo_lit.bench", "kangaroo_lit.bench_decode"]  # the benchmark module, old name or new


def own(name):
    return name == "kangaroo_lit" or name.startswith("kangaroo_lit.")


def import_package():
    imported = []
    for name in MODULES:
        importlib.import_module(name)
        imported.append(name)
    for name in BENCH:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise  # the benchmark exists but one of its imports is missing
        else:
            imported.append(name)
    if not any(name in imported for name in BENCH):
        raise SystemExit(f"none of the benchmark modules {BENCH} exists")
    # and every other module of the package (not the __main__ ones: they run the command line)
    import kangaroo_lit

    for info in pkgutil.walk_packages(kangaroo_lit.__path__, "kangaroo_lit."):
        if info.name.rsplit(".", 1)[-1] != "__main__" and info.name not in imported:
            importlib.import_module(info.name)
            imported.append(info.name)
    return imported


def caller():
    """The innermost frame of the stack inside kangaroo_lit, else the direct caller, as 'file:line'."""
    frames = traceback.extract_stack()[:-2]
    inside = [f for f in frames if os.sep + "kangaroo_lit" + os.sep in f.filename]
    f = (inside or frames)[-1]
    return f"{f.filename}:{f.lineno}"


if sys.argv[1] == "probe":
    before = set(sys.modules)
    import_package()
    print(json.dumps([m for m in sys.modules if m not in before and not own(m)]))
    raise SystemExit(0)

for name in json.loads(sys.argv[2]):  # dependencies first, in the order the package loaded them
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # e.g. a module registered under an alias: the package imports it its own way anyway
filters = [repr(f) for f in warnings.filters]
environ = dict(os.environ)

# Only to say where a change came from; the verdict compares the snapshots.
origins = []
for fname in ("filterwarnings", "simplefilter"):
    def wrapper(*args, _f=getattr(warnings, fname), _n=fname, **kwargs):
        shown = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        origins.append(f"warnings.{_n}({shown}) at {caller()}")
        return _f(*args, **kwargs)
    setattr(warnings, fname, wrapper)
environ_class = type(os.environ)
setitem = environ_class.__setitem__
def traced_setitem(self, key, value):
    origins.append(f"os.environ[{key!r}] = {value!r} at {caller()}")
    setitem(self, key, value)
environ_class.__setitem__ = traced_setitem

imported = import_package()

after_filters = [repr(f) for f in warnings.filters]
after = dict(os.environ)
print(json.dumps({
    "imported": imported,
    "filters_added": [f for f in after_filters if f not in filters],
    "filters_removed": [f for f in filters if f not in after_filters],
    "filters_equal": after_filters == filters,
    "environ_added": {k: after[k] for k in after.keys() - environ.keys()},
    "environ_removed": sorted(environ.keys() - after.keys()),
    "environ_changed": {k: [environ[k], after[k]] for k in environ.keys() & after.keys() if environ[k] != after[k]},
    "origins": origins,
}))
'''


def _child(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"importing kangaroo_lit failed:\n{proc.stderr[-4000:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_importing_the_package_sets_no_warnings_filter_and_no_environment_variable():
    dependencies = _child("probe")
    report = json.loads(_child("check", dependencies))
    assert "kangaroo_lit.model" in report["imported"] and "kangaroo_lit.cli" in report["imported"]
    changes = {k: report[k] for k in ("filters_added", "filters_removed", "environ_added", "environ_removed",
                                      "environ_changed") if report[k]}
    if not report["filters_equal"] and not changes:
        changes["filters_reordered"] = True
    where = "\n".join(f"  {o}" for o in report["origins"]) or "  (not through warnings.* or os.environ[...]=)"
    assert not changes, f"importing kangaroo_lit changed process-wide state: {changes}\nmade by:\n{where}"
    assert "HF_HUB_OFFLINE" not in report["environ_added"]
