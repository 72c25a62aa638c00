#!/usr/bin/env python3
"""List Rust functions longer than a limit (default 80 lines), so long ones stay rare.

usage: fn-length.py [--max N] [--skip-tests] [--allow FILE:FN]... PATH...
       (directories are searched for *.rs; --allow lets one known function through, shown
       as such)

Counts from the `fn` line to its closing brace. Braces inside strings, chars and comments
are ignored; that is all the parsing it needs (no syn). Exits 1 when any function is over.
"""
import os
import re
import sys

FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?((const|async|unsafe|extern\s+\"C\")\s+)*fn\s+(\w+)")
TEST_MOD = re.compile(r"^\s*mod\s+tests\s*\{")


def code_only(text):
    """`text` with string/char literal contents and comments blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif (m := re.match(r'(b?r)(#*)"', text[i:i + 40])) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = '"' + m.group(2)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'" and (m := re.match(r"'(\\(x..|u\{[0-9a-fA-F]+\}|.)|[^\\'])'", text[i:i + 12])):
            out.append(" " * m.end())
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(path, skip_tests):
    with open(path, encoding="utf-8") as f:
        lines = code_only(f.read()).split("\n")
    i = 0
    while i < len(lines):
        if skip_tests and TEST_MOD.match(lines[i]) and i > 0 and "#[cfg(test)]" in lines[i - 1]:
            i = block_end(lines, i) + 1
            continue
        m = FN.match(lines[i])
        if m:
            end = block_end(lines, i)
            if end is not None:
                yield m.group(5), i + 1, end - i + 1
        i += 1


def block_end(lines, start):
    """Line index of the brace closing the first block opened at or after `start`; None for
    a declaration without a body (`fn f();`)."""
    depth, opened = 0, False
    for k in range(start, len(lines)):
        for ch in lines[k]:
            if ch == "{":
                depth, opened = depth + 1, True
            elif ch == "}":
                depth -= 1
                if opened and depth == 0:
                    return k
            elif ch == ";" and not opened and depth == 0:
                return None
    return None


def main(argv):
    limit, skip_tests, paths, allowed = 80, False, [], set()
    it = iter(argv)
    for a in it:
        if a == "--max":
            limit = int(next(it))
        elif a == "--allow":
            allowed.add(next(it))
        elif a == "--skip-tests":
            skip_tests = True
        else:
            paths.append(a)
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = [d for d in dirs if d not in ("target", "artifacts", "corpus")]
                files += [os.path.join(root, x) for x in names if x.endswith(".rs")]
        else:
            files.append(p)
    over = []
    for f in sorted(files):
        for name, line, length in functions(f, skip_tests):
            if length > limit:
                over.append((length, f, line, name))
    failed = False
    for length, f, line, name in sorted(over, reverse=True):
        known = f"{os.path.normpath(f)}:{name}" in allowed
        failed |= not known
        note = " (allowed for now)" if known else ""
        print(f"{f}:{line}: fn {name} is {length} lines (limit {limit}){note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
