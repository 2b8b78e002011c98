"""The repository itself, as ``git ls-files`` lists it.

Raw results (goodput archives, worker logs, traces) are kept outside git
and listed with their sha256 in docs/results-manifest.md, so no tracked
file may be large. And the project speaks for itself: its code, docs and
scripts do not point at files outside the repository, at paths of the
machine they were written on, or at an issue tracker's numbers; and every
relative link of its Markdown leads to a tracked file or folder.

Skipped where the tree is not a git checkout (a source archive).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()
MAX_BYTES = 1_000_000
# References that lead out of the repository. An issue number: "issue 11",
# "Issue #11", "issues #3"; "(#12)" as a tracker's pull-request suffix;
# "fixes #12", "see #12", "PR #12". Plain prose ("issues the copy", "the
# router issues 2 ids", "an issue with", a Markdown heading "# 2.",
# "fusion#3" in a kernel name) does not match; the verb "issue" before a
# bare number does, so write "issuing the copies" there.
OUTSIDE = (
    ("a sibling checkout", re.compile(r"\.\./shared\b")),
    ("a path of the development machine", re.compile(r"/work/")),
    ("an issue number",
     re.compile(r"\bissue\s+#?\d+\b|\bissues\s+#\d+\b|\(#\d+\)|"
                r"\b(?:fix(?:es|ed)?|close[sd]?|resolve[sd]?|see|PR)\s+#\d+\b",
                re.I)),
    ("notes kept outside the repository",
     re.compile(r"\bFIELD_NOTES\b|\bKINDS\.md\b")),
)
# A Markdown link's target: [text](target) or [text](target "title").
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@functools.lru_cache(maxsize=None)
def tracked() -> tuple[str, ...]:
  """Tracked paths that exist in the working tree, relative to the root."""
  try:
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO,
                          capture_output=True, check=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    pytest.skip("not a git checkout (or no git)")
  paths = [p for p in proc.stdout.decode("utf-8", "surrogateescape")
           .split("\0") if p]
  if not paths:
    pytest.skip("git lists no tracked files")
  return tuple(p for p in paths if os.path.lexists(REPO / p))


def text_of(path: str) -> str | None:
  """The file's text, or None for a binary file (a NUL in its first 8 KiB)."""
  full = REPO / path
  if full.is_symlink() or not full.is_file():
    return None
  data = full.read_bytes()
  if b"\0" in data[:8192]:
    return None
  return data.decode("utf-8", "replace")


def test_no_tracked_file_over_1_mb():
  big = sorted((os.lstat(REPO / p).st_size, p) for p in tracked()
               if os.lstat(REPO / p).st_size > MAX_BYTES)
  assert not big, (
      "tracked files over 1,000,000 bytes (keep raw results outside git and "
      "list them in docs/results-manifest.md):\n" +
      "\n".join(f"  {size:>12,}  {p}" for size, p in reversed(big)))


def test_no_reference_outside_the_repository():
  found = []
  for path in tracked():
    if path == THIS:
      continue
    text = text_of(path)
    if text is None:
      continue
    for what, pattern in OUTSIDE:
      for m in pattern.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        found.append(f"  {path}:{line}: {what}: {m.group(0)!r}")
  assert not found, (
      "say what the referenced thing is instead of pointing outside the "
      "repository:\n" + "\n".join(found))


def test_markdown_links_resolve():
  files = set(tracked())
  folders = {str(Path(p).parent.as_posix()) for p in files}
  folders |= {f.rsplit("/", k)[0] for f in list(folders)
              for k in range(1, f.count("/") + 1)}
  broken = []
  for path in sorted(p for p in files if p.endswith(".md")):
    text = text_of(path)
    if text is None:
      continue
    for m in LINK.finditer(text):
      target = m.group(1).split("#", 1)[0]
      if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        continue  # an anchor in the same file, or a URL
      rel = os.path.normpath(os.path.join(os.path.dirname(path), target))
      rel = Path(rel).as_posix()
      if rel.startswith("../") or rel == "..":
        ok = False
      else:
        ok = rel in files or rel in folders or rel == "."
      if not ok:
        line = text.count("\n", 0, m.start()) + 1
        broken.append(f"  {path}:{line}: {m.group(1)}")
  assert not broken, "Markdown links to nothing tracked:\n" + "\n".join(broken)


def test_cited_docs_exist():
  """Code and scripts cite the dated notes by path (``docs/notes/...md``):
  each path cited must be a tracked file."""
  files = set(tracked())
  missing = []
  for path in tracked():
    if path == THIS:
      continue
    text = text_of(path)
    if text is None:
      continue
    for m in re.finditer(r"\bdocs/[\w./-]*\w\.md\b", text):
      if m.group(0) not in files:
        line = text.count("\n", 0, m.start()) + 1
        missing.append(f"  {path}:{line}: {m.group(0)}")
  assert not missing, "cited docs that are not tracked:\n" + "\n".join(missing)
