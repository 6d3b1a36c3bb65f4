#!/usr/bin/env python3
"""Every relative link in README.md, BENCHMARKS.md and docs/*.md resolves.

Reads inline links and images, `[text](target)` and `![alt](target)`, and reference definitions,
`[label]: target`, outside fenced code blocks and inline code. A target with a scheme (`https:`,
`mailto:`, ...) is left alone. Any other target is a path relative to the Markdown file's
directory, which must exist. A `#anchor` on a Markdown file (or alone, for the file itself) must
name one of that file's headings, by GitHub's rule for heading ids: the heading's text lowercased,
every character but letters, digits, '-', '_' and spaces dropped, spaces turned into '-', and
'-1', '-2', ... appended to repeats. Only ATX headings (`# Title`) and explicit `id=`/`name=`
anchors count; an anchor on any other file (a line in a source file, say) is not checked.

Prints each broken link as `file:line: target: why` and exits 1; exits 0 when every link resolves.
Standard library only: scripts/test.sh runs it before the build.
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"<[^>]*\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def documents():
    """The Markdown files whose links are checked."""
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return [path for path in files if path.is_file()]


def prose_lines(text):
    """The file's lines with fenced code blocks blanked out, so line numbers stay true."""
    lines = text.split("\n")
    fence = None
    for index, line in enumerate(lines):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                lines[index] = ""
        else:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and line.strip() == match.group(1):
                fence = None
            lines[index] = ""
    return lines


def without_code_spans(text):
    """`text` with every inline code span blanked out (newlines kept). A span opens and closes with
    backtick runs of the same length and never crosses a blank line; an unmatched run is literal."""
    out = list(text)
    position = 0
    while True:
        opening = re.compile(r"`+").search(text, position)
        if not opening:
            break
        run = opening.group(0)
        closing = re.compile(r"(?<!`)" + run + r"(?!`)").search(text, opening.end())
        if not closing or re.search(r"\n[ \t]*\n", text[opening.end():closing.start()]):
            position = opening.end()
            continue
        for index in range(opening.start(), closing.end()):
            if out[index] != "\n":
                out[index] = " "
        position = closing.end()
    return "".join(out)


def slug(heading):
    """GitHub's id for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags are not text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path, cache={}):
    """Every anchor a Markdown file defines."""
    if path not in cache:
        found = set()
        seen = {}
        for line in prose_lines(path.read_text(encoding="utf-8")):
            heading = ATX_HEADING.match(line)
            if heading:
                base = slug(heading.group(1) or "")
                count = seen.get(base, 0)
                seen[base] = count + 1
                found.add(base if count == 0 else f"{base}-{count}")
            found.update(HTML_ANCHOR.findall(line))
        cache[path] = found
    return cache[path]


def problem(document, target):
    """Why `target`, linked from `document`, does not resolve; None when it does."""
    path_part, _, anchor = target.partition("#")
    if path_part:
        resolved = (document.parent / path_part).resolve()
        if not resolved.exists():
            return "no such file or directory"
    else:
        resolved = document
    if anchor and resolved.suffix == ".md" and resolved.is_file():
        if anchor not in anchors_of(resolved):
            return f"no heading with the id '{anchor}' in {os.path.relpath(resolved, ROOT)}"
    return None


def main():
    broken = []
    checked = 0
    files = documents()
    for document in files:
        text = without_code_spans("\n".join(prose_lines(document.read_text(encoding="utf-8"))))
        targets = [(m.start(1), m.group(1)) for m in INLINE_LINK.finditer(text)]
        targets += [(m.start(1), m.group(1)) for m in REFERENCE_DEFINITION.finditer(text)]
        for offset, target in sorted(targets):
            if not target or SCHEME.match(target):
                continue
            checked += 1
            why = problem(document, target)
            if why:
                line = text.count("\n", 0, offset) + 1
                broken.append(f"{os.path.relpath(document, ROOT)}:{line}: {target}: {why}")
    for entry in broken:
        print(entry)
    if broken:
        print(f"check-links: {len(broken)} of {checked} relative links do not resolve")
        return 1
    print(f"check-links: all {checked} relative links in {len(files)} files resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
