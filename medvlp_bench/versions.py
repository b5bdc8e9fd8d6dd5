"""Versions of methods and tasks, and the fingerprint check that keeps them honest.

A method's version is its class attribute ``version`` (``Method.version = 1``; a subclass sets its own); a
task's is ``version:`` in ``configs/task/<name>.yaml``. Both are integers, bumped by hand when behaviour
changes. The method version enters the pre-training cache key (``checkpoint.pretrain_key``) and both enter every
result row, so ``medbench bench`` re-runs a cell whose stored rows have other versions and the leaderboard
never averages rows of different versions.

People forget to bump, so ``versions.lock.json`` records, per method and task config, the version and a
sha256 of the sources; ``tests/test_versions.py`` fails when a source changed and the version did not.
Sources of a method: its yaml (plus the yamls in its ``defaults`` and its named pre-training corpus) and the
modules of ``medvlp_bench.methods`` / ``.tasks`` / ``.datasets`` that a ``_target_`` in them names, with the
modules of those packages they import. Of a task: its yaml and data yaml, the task kind module and the
datamodule modules (for phantoms also the generator ``phantom_<kind>.py``). Core modules
(``medvlp_bench/*.py``: encoders, losses, data, ...) are shared by all and not fingerprinted: a behaviour
change there must bump the affected versions by hand. Hashes are of the parsed yaml (without the task's own
``version``) and of the AST without docstrings, so comments, formatting and docstrings do not count.

    python -m medvlp_bench.versions            # check: exit 1 and say what to bump
    python -m medvlp_bench.versions --update   # record; refuses a changed source whose version was not bumped
    python -m medvlp_bench.versions --update --unchanged phantom_ct_seg,phantom_cxr_seg
        # record the new fingerprints of the named ones without a bump: a speed-up or refactor shown to give the
        # same results (say how in the commit); the names are explicit so nothing else is silenced with them
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.util
import json
import pkgutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

#: the packages whose modules are fingerprinted (core modules are not, see the module docstring)
PACKAGES = ("medvlp_bench.methods", "medvlp_bench.tasks", "medvlp_bench.datasets")
LOCK = Path(__file__).with_name("versions.lock.json")
UPDATE = "python -m medvlp_bench.versions --update"


def as_version(value: object, what: str) -> int:
    """A version as an int >= 1, from an int or a digit string (old rows and configs have ``"1"``)."""
    if isinstance(value, float) and value.is_integer():  # pandas turns int columns with gaps into floats
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} version {value!r} is not a positive integer (versions are 1, 2, 3, ...)")
    return value


def method_version(target: str) -> int:
    """``version`` of the method class named by a ``model._target_`` (imports the class)."""
    from hydra.utils import get_class

    return as_version(getattr(get_class(target), "version", 1), f"method {target}")


@dataclass(frozen=True)
class Entry:
    """One method or task config: its version, the sha256 of each source and of all of them."""

    version: int
    sha256: str
    sources: dict[str, str]


def _read(path: Path) -> str:
    """Source text (a seam for tests that simulate an edit)."""
    return Path(path).read_text()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ast_form(node: Any) -> Any:
    """A JSON-able form of an AST that omits empty fields, so it does not change between Python versions."""
    if isinstance(node, ast.AST):
        fields = {f: getattr(node, f, None) for f in node._fields}
        return [type(node).__name__, {f: _ast_form(v) for f, v in fields.items() if v is not None and v != []}]
    if isinstance(node, list):
        return [_ast_form(x) for x in node]
    return repr(node)


def _module_hash(tree: ast.Module) -> str:
    for node in ast.walk(tree):  # drop docstrings: documentation edits are not behaviour
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
                node.body = node.body[1:] or [ast.Pass()]
    return _sha(json.dumps(_ast_form(tree)))


def _config_dir() -> Path:
    from .config import config_dir

    return config_dir()


def _yamls(group: str, name: str, out: dict[str, dict]) -> dict[str, dict]:
    """``configs/<group>/<name>.yaml`` and every config in its ``defaults``, parsed, by relative path."""
    rel = f"configs/{group}/{name}.yaml"
    if rel not in out:
        path = _config_dir() / group / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"no config {rel}")
        out[rel] = yaml.safe_load(_read(path)) or {}
        for entry in out[rel].get("defaults") or []:
            if isinstance(entry, str) and entry != "_self_":  # `scratch` or `phantom_cxr@parts.phantom_cxr`
                _yamls(group, entry.split("@")[0], out)
            elif isinstance(entry, dict) and len(entry) == 1:  # `/data@data: rsna`
                ((key, value),) = entry.items()
                key = str(key).split("@")[0]
                if value is not None:
                    _yamls(key[1:] if key.startswith("/") else f"{group}/{key}", str(value), out)
            elif entry != "_self_":
                raise ValueError(f"{rel}: defaults entry {entry!r} is not understood by medvlp_bench.versions")
    return out


def _targets(node: Any) -> Iterator[dict]:
    """Every mapping with a ``_target_`` in a parsed yaml."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node
        for v in node.values():
            yield from _targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets(v)


class _Scan:
    """One pass over the sources: each module is read and hashed once, so all entries see the same tree."""

    def __init__(self) -> None:
        pkgs = [importlib.import_module(p) for p in PACKAGES]
        self.tracked = {f"{p.__name__}.{m.name}" for p in pkgs for m in pkgutil.iter_modules(p.__path__)}
        self.modules: dict[str, tuple[str, list[str]]] = {}  # module -> (hash, tracked modules it imports)

    def module(self, mod: str) -> tuple[str, list[str]]:
        if mod not in self.modules:
            spec = importlib.util.find_spec(mod)
            if spec is None or spec.origin is None:
                raise ValueError(f"module {mod} not found")
            tree = ast.parse(_read(Path(spec.origin)))
            imported: list[str] = []
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    rel = "." * node.level + (node.module or "")
                    base = importlib.util.resolve_name(rel, mod.rpartition(".")[0])
                    imported += [base, *(f"{base}.{a.name}" for a in node.names)]
                elif isinstance(node, ast.Import):
                    imported += [a.name for a in node.names]
            self.modules[mod] = (_module_hash(tree), [m for m in imported if m in self.tracked])
        return self.modules[mod]

    def targeted(self, node: dict) -> list[str]:
        """The tracked module a ``_target_`` names, plus modules it loads by name (no import an AST shows)."""
        target = node["_target_"]
        mods = [m for m in self.tracked if target.startswith(m + ".")]
        if target == "medvlp_bench.datasets.phantoms.PhantomDataModule" and node.get("kind"):
            mods.append(f"medvlp_bench.datasets.phantom_{node['kind']}")  # phantoms.py: importlib by kind
        return mods

    def closure(self, mod: str, out: dict[str, str]) -> None:
        """Hash ``mod`` and, recursively, the tracked modules it imports, into ``out``."""
        if mod not in out:
            out[mod], imported = self.module(mod)
            for name in imported:
                self.closure(name, out)


def _entry(version: int, configs: dict[str, dict], scan: _Scan) -> Entry:
    sources = {rel: _sha(json.dumps(data, sort_keys=True, default=str)) for rel, data in configs.items()}
    mods: dict[str, str] = {}
    for data in configs.values():
        for node in _targets(data):
            for mod in scan.targeted(node):
                scan.closure(mod, mods)
    sources.update(mods)
    return Entry(version, _sha(json.dumps(sources, sort_keys=True)), dict(sorted(sources.items())))


def _method_target(configs: dict[str, dict]) -> str:
    for data in configs.values():  # the method's own yaml first, then those it inherits from
        target = (data.get("model") or {}).get("_target_")
        if target:
            return str(target)
    raise ValueError(f"{next(iter(configs))} has no model._target_")


def method_entry(name: str, scan: _Scan | None = None) -> Entry:
    """The version and fingerprint of ``configs/method/<name>.yaml``."""
    configs = _yamls("method", name, {})
    corpus = next((d["pretrain"]["data"] for d in configs.values() if (d.get("pretrain") or {}).get("data")), None)
    if corpus:
        _yamls("data", str(corpus), configs)
    return _entry(method_version(_method_target(configs)), configs, scan or _Scan())


def task_entry(name: str, scan: _Scan | None = None) -> Entry:
    """The version and fingerprint of ``configs/task/<name>.yaml`` (its own ``version`` is not hashed)."""
    configs = _yamls("task", name, {})
    own = configs[f"configs/task/{name}.yaml"]
    version = as_version(own.pop("version", 1), f"task {name}")
    return _entry(version, configs, scan or _Scan())


def current() -> dict[str, dict[str, Entry]]:
    """Entries of every method and task config shipped in the package."""
    scan = _Scan()
    names = {group: sorted(p.stem for p in (_config_dir() / group).glob("*.yaml")) for group in ("method", "task")}
    return {
        "methods": {n: method_entry(n, scan) for n in names["method"]},
        "tasks": {n: task_entry(n, scan) for n in names["task"]},
    }


def read_lock(path: Path = LOCK) -> dict[str, dict[str, Entry]]:
    if not Path(path).is_file():
        return {"methods": {}, "tasks": {}}
    raw = json.loads(Path(path).read_text())
    return {group: {n: Entry(**e) for n, e in raw.get(group, {}).items()} for group in ("methods", "tasks")}


def _bump_hint(group: str, name: str, version: int) -> str:
    if group == "tasks":
        return f"set `version: {version + 1}` in configs/task/{name}.yaml"
    from hydra.utils import get_class

    cls = get_class(_method_target(_yamls("method", name, {})))
    return f"set `version: ClassVar[int] = {version + 1}` on {cls.__module__}.{cls.__qualname__}"


def _diff(lock: dict[str, dict[str, Entry]], now: dict[str, dict[str, Entry]]) -> list[tuple[bool, str]]:
    """(refused, message) per disagreement; refused ones cannot be recorded until a version is bumped."""
    out = []
    for group in ("methods", "tasks"):
        what = group[:-1]
        for name, cur in now[group].items():
            old = lock[group].get(name)
            if old is None:
                out.append((False, f"{what} {name!r} is not in the versions lock: run `{UPDATE}`"))
            elif cur.version < old.version:
                out.append((True, f"{what} {name!r}: version {cur.version} is below the recorded {old.version}"))
            elif cur.sha256 != old.sha256 and cur.version == old.version:
                changed = sorted(k for k in {*cur.sources, *old.sources} if cur.sources.get(k) != old.sources.get(k))
                msg = (
                    f"{what} {name!r}: its sources changed ({', '.join(changed)}) but its version is still "
                    f"{cur.version}. If behaviour changed, {_bump_hint(group, name, cur.version)}, then run "
                    f"`{UPDATE}` to record the new fingerprint"
                )
                out.append((True, msg))
            elif cur != old:
                out.append((False, f"{what} {name!r}: version {cur.version} is not recorded yet: run `{UPDATE}`"))
        gone = sorted(set(lock[group]) - set(now[group]))
        out += [(False, f"{what} {n!r} no longer exists: run `{UPDATE}`") for n in gone]
    return out


def problems(lock: dict[str, dict[str, Entry]], now: dict[str, dict[str, Entry]]) -> list[str]:
    """What the lock and the tree disagree on, one line each, saying what to do."""
    return [msg for _, msg in _diff(lock, now)]


def _changed_sources(old: Entry, cur: Entry) -> list[str]:
    return sorted(k for k in {*cur.sources, *old.sources} if cur.sources.get(k) != old.sources.get(k))


def _unchanged_refusal(old: Entry | None, cur: Entry | None, changed: list[str]) -> str | None:
    """Why ``--unchanged`` cannot record this entry, or None when it can."""
    if old is None or cur is None:
        return "not a method or task in the versions lock"
    if old.version != cur.version:
        return f"its version moved ({old.version} -> {cur.version}): record it with a plain --update"
    if not changed:
        return "its sources did not change"
    configs = [c for c in changed if c.startswith("configs/")]
    if configs:
        return f"its config sources changed ({', '.join(configs)}), which changes behaviour: bump its version"
    return None


def update(path: Path = LOCK, unchanged: frozenset[str] = frozenset()) -> list[str]:
    """Record the current versions and fingerprints; returns the refusals (nothing is written if any).

    ``unchanged``: methods or tasks whose source *modules* changed without a behaviour change (a speed-up shown
    to give equal results): their new fingerprints are recorded at the same version, and each one's changed
    sources are printed. A name that is not a method or task, whose sources did not change, whose version
    moved, or whose yaml configs changed (a config edit is a behaviour change) is refused with that reason, so
    the list cannot silence more than the code it names.
    """
    from .atomic import atomic_write_text

    now = current()
    lock = read_lock(path)
    refused = []
    for name in sorted(unchanged):
        group = next((g for g in ("methods", "tasks") if name in now[g]), "")
        old, cur = lock[group].get(name) if group else None, now[group][name] if group else None
        changed = _changed_sources(old, cur) if old and cur else []
        why = _unchanged_refusal(old, cur, changed)
        if why:
            refused.append(f"--unchanged {name!r}: {why}")
        else:
            print(f"recording {group[:-1]} {name!r} at version {cur.version}; changed sources: {', '.join(changed)}")
            lock[group][name] = cur
    refused += [msg for blocking, msg in _diff(lock, now) if blocking]
    if not refused:
        payload = {g: {n: asdict(e) for n, e in entries.items()} for g, entries in now.items()}
        atomic_write_text(Path(path), json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return refused


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medvlp_bench.versions", description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="record versions and fingerprints (bumped ones only)")
    p.add_argument("--lock", type=Path, default=LOCK, help=f"lock file (default {LOCK})")
    p.add_argument(
        "--unchanged",
        default="",
        help="with --update: comma-separated methods/tasks whose changed sources keep their behaviour (no bump)",
    )
    args = p.parse_args(argv)
    if args.unchanged and not args.update:
        p.error("--unchanged goes with --update")
    if args.update:
        refused = update(args.lock, frozenset(n.strip() for n in args.unchanged.split(",") if n.strip()))
        for line in refused:
            print(f"refused: {line}", file=sys.stderr)
        print("nothing recorded" if refused else f"recorded {args.lock}")
        return 1 if refused else 0
    found = problems(read_lock(args.lock), current())
    for line in found:
        print(line, file=sys.stderr)
    print(f"{len(found)} problem(s)" if found else f"{args.lock.name} matches the sources")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
