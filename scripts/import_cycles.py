#!/usr/bin/env python3
"""Lists pairs of source files of a crate that import each other (`use crate::…`,
`use super::…`, or a `crate::a::b` path in the code), which the house rule forbids:
the stages depend one way. Exit status 1 when there is a pair.

    scripts/import_cycles.py src server/src convert/src capi/src
"""
import re
import sys
from pathlib import Path


def module_files(root: Path):
    """Maps module paths (('image', 'decode'), …) to files of the crate rooted at root."""
    mods = {}
    for f in root.rglob("*.rs"):
        rel = f.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "bin" or parts == ["main"] and (root / "lib.rs").exists():
            continue  # binaries are crates of their own
        if parts[-1] in ("mod", "lib", "main"):
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def reexports(mods: dict):
    """Names a lib.rs / mod.rs re-exports (`pub use a::b::{X, Y}`), mapped to the module path
    they come from, so that `crate::X` counts as an import of the file defining X."""
    out = {}
    for m, f in mods.items():
        if f.stem not in ("lib", "mod"):
            continue
        text = f.read_text()
        for u in re.finditer(r"pub use ((?:[A-Za-z_][A-Za-z0-9_]*::)+)(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))", text):
            src = m + tuple(p for p in u.group(1).split("::") if p)
            names = (u.group(2) or u.group(3)).split(",")
            for n in names:
                n = n.strip().split("::")[-1].split(" as ")[-1].strip()
                if n and n != "self":
                    out[m + (n,)] = src
    return out


def resolve(path: tuple, mods: dict, again: dict):
    """The file a module path (possibly ending in an item) lives in."""
    while True:
        probe = path
        while probe and probe not in mods:
            if probe in again:
                path = again[probe] + path[len(probe):]
                break
            probe = probe[:-1]
        else:
            return mods.get(probe)


def imports(f: Path, me: tuple, mods: dict, again: dict):
    """The crate files `f` refers to (outside its #[cfg(test)] module)."""
    text = f.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r"//[^\n]*", "", text)
    found = set()
    # A file's `super` is its module's parent; a lib.rs / mod.rs also names its children
    # directly (`use session::Decoder`, `pub use task::TextAnswer`).
    parent = me[:-1]
    if f.stem in ("lib", "mod"):
        for m in re.finditer(r"(?<![:\w])([a-z_][a-z0-9_]*)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)", text):
            if me + (m.group(1),) in mods:
                target = mods[me + (m.group(1),)]
                if target != f:
                    found.add(target)
    for m in re.finditer(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
        base = () if m.group(1) == "crate" else parent
        target = resolve(base + tuple(p for p in m.group(2).split("::") if p), mods, again)
        if target and target != f:
            found.add(target)
    # `use super::{a, b}` / `use crate::{a::b, c}` groups
    for m in re.finditer(r"\b(crate|super)::\{([^}]*)\}", text):
        base = () if m.group(1) == "crate" else parent
        for item in m.group(2).split(","):
            path = base + tuple(p.strip() for p in item.split("::") if p.strip())
            target = resolve(path, mods, again)
            if target and target != f:
                found.add(target)
    return found


def main():
    bad = 0
    for root in map(Path, sys.argv[1:] or ["src"]):
        mods = module_files(root)
        again = reexports(mods)
        graph = {f: imports(f, m, mods, again) for m, f in mods.items()}
        for a, targets in graph.items():
            for b in targets:
                if a < b and a in graph.get(b, ()):
                    print(f"{a} <-> {b}")
                    bad += 1
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
