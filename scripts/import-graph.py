#!/usr/bin/env python3
"""Prints the import graph between src/'s top-level modules and any cycle in it.

An edge A -> B exists when a file under src/A (or src/A.rs) names `crate::B` (in a `use`,
including grouped `use crate::{B, ...}`, or in a path). Test-only modules (`tests.rs`,
`#[cfg(test)] mod tests { ... }` blocks at a file's end) are left out: they may import freely.
Exit code 1 when the graph has a cycle, so CI can keep it acyclic.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def top_module(path):
    rel = os.path.relpath(path, SRC)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".rs") else head


def strip_tests(text):
    # Drop a trailing `#[cfg(test)] mod tests { ... }` block.
    m = re.search(r"#\[cfg\(test\)\]\s*mod \w+\s*\{", text)
    return text[: m.start()] if m else text


def names(text):
    found = set(re.findall(r"crate::([a-z_][a-z0-9_]*)", text))
    for group in re.findall(r"crate::\{([^}]*)\}", text, re.S):
        for part in group.split(","):
            part = part.strip()
            if part:
                found.add(re.split(r"[:\s]", part)[0])
    return found


def main():
    mods = set()
    edges = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            mod = top_module(path)
            if mod in ("main", "lib"):
                continue
            mods.add(mod)
            if f == "tests.rs":
                continue
            text = strip_tests(open(path, encoding="utf-8").read())
            for n in names(text):
                if n != mod and n not in ("FastMap", "FastDashMap"):
                    edges.setdefault(mod, set()).add(n)
    for m in sorted(mods):
        print(f"{m:10} -> {', '.join(sorted(n for n in edges.get(m, ()) if n in mods)) or '-'}")
    # Cycles: Tarjan's strongly connected components.
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in mods:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    if sccs:
        for c in sccs:
            print("cycle:", " <-> ".join(c))
        return 1
    print("no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
