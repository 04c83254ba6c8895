#!/usr/bin/env python3
"""No module cycles: the graph of src/'s top-level modules (who names whom through `crate::`
paths, or through the crate root's re-exports) has none. Unit tests (`#[cfg(test)] mod tests`
at the end of a file) do not count. Prints the graph; exits 1 naming the modules of each
cycle. A check of the repository, run by .ci/run."""
import re, os, collections, sys
root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
lib = open(os.path.join(root, 'lib.rs')).read()
names = {}
for m in re.finditer(r'^pub use ([a-z_]+)(?:::[a-z_]+)*::(\{[^}]*\}|[A-Za-z_]+);', lib, re.M):
    mod, what = m.group(1), m.group(2)
    for n in re.findall(r'[A-Za-z_][A-Za-z_0-9]*', what):
        names[n] = mod
top = set(re.findall(r'^(?:pub(?:\(crate\))? )?mod ([a-z_]+);', lib, re.M))
edges = collections.defaultdict(set)
for dp, dn, fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p = os.path.join(dp, f); rel = os.path.relpath(p, root)
        m = rel[:-3].split('/')[0]
        if m not in top: continue
        src = open(p).read()
        cut = src.find('#[cfg(test)]\nmod tests')
        if cut >= 0: src = src[:cut]
        src = re.sub(r'//.*', '', src)
        for a, b in re.findall(r'crate::([A-Za-z_]+)(?:::\{([^}]*)\})?', src):
            targets = [a] if a in top else ([names[a]] if a in names else [])
            if b and a not in top:
                pass
            for t in targets:
                if t != m: edges[m].add(t)
        for grp in re.findall(r'use crate::\{([^}]*)\}', src):
            for n in re.findall(r'[A-Za-z_][A-Za-z_0-9]*', grp):
                t = n if n in top else names.get(n)
                if t and t != m: edges[m].add(t)
# strongly connected components
index = {}; low = {}; stack = []; on = set(); sccs = []; i = [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
for v in list(top):
    if v not in index: strong(v)
for k in sorted(edges): print(f'{k} -> {", ".join(sorted(edges[k]))}')
if sccs:
    sys.exit(f'module cycles: {sccs}')
print('no module cycles')
