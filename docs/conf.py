"""Sphinx configuration of the aalig-optax documentation.

Build from the repository root with ``bash docs/build.sh [OUTDIR]``.

Two things happen here at build time, so that no text is copied by hand:

* The API page (``api.md``) gets one section per group of ``API_GROUPS``,
  generated from ``aalig_optax.__all__``: a public name that no group lists
  is documented under "Other public names", and a listed name that is not in
  ``__all__`` fails the build.
* Markdown files of the repository pulled into pages with MyST's
  ``{include}`` (README.md, examples/README.md, ...) have their relative links
  and images rewritten: a link to a file that is itself pulled into a page
  points at that page, a link to another file of the repository becomes a
  download of that file, and a link that leaves the repository or points at
  nothing fails the build.
"""

from __future__ import annotations

import pathlib
import posixpath
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import aalig_optax  # noqa: E402  (after the path set-up)

project = "aalig-optax"
author = "aalig-optax contributors"
copyright = "aalig-optax contributors"  # noqa: A001  (Sphinx's name)
release = aalig_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
# Single backticks in the (RST) docstrings render as code, as in Markdown.
default_role = "code"

# MyST: $...$ and $$...$$ maths, ::: fences, and anchors for headings down to
# level 3 (README.md links to "#bad-input").
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc + napoleon: Google-style docstrings. Signatures without type hints:
# chex's aliases would show as the long unions they stand for, and the
# docstrings' Args say what each argument is.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False
# "Extra args of update:" in a docstring: the keyword arguments that an
# optax ``update`` takes besides (updates, state, params), set out like Args.
# "Read by name:": a state's packed scalars, read through properties.
napoleon_custom_sections = [("Extra args of update", "params_style"),
                            ("Read by name", "params_style")]

html_theme = "sphinx_book_theme"
html_title = f"aalig-optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

# --------------------------------------------------------------------------
# The API page, generated from aalig_optax.__all__.

# (title, one line about the group, names in the order shown).
API_GROUPS = [
    ("AALIG", "The optimiser, its step size alone, and the arguments to "
     "keep static under `optax.inject_hyperparams`.",
     ["aalig", "scale_by_aalig", "STATIC_ARGS"]),
    ("AOV rules and starting AOVs", "The section-end AOV updates that "
     "`aov_rule=` names, as pure functions, and the per-example loss table "
     "that `initial_aov=` takes.",
     ["update_aovs", "update_aovs_reflect", "update_aovs_anneal",
      "loss_table"]),
    ("ALI-G", "The interpolation special case: no tables, the batch loss "
     "as `value=`, and its L2-ball constraint.",
     ["alig", "scale_by_alig", "project_l2_ball"]),
    ("State", "What `init` returns and `update` carries, and the AOV "
     "tables with every update still due applied.",
     ["ScaleByAaligState", "AaligConfig", "ScaleByAligState",
      "current_aovs"]),
    ("Metrics and checks", "Logging, and host-side errors for what a jitted "
     "step can only count.",
     ["aalig_metrics", "check_indices", "check_hyperparams"]),
    ("Checkpoints", "Save and restore of the state on Orbax's "
     "`CheckpointManager`, checked against the transform (needs "
     "`orbax-checkpoint`).",
     ["CheckpointManager", "save_state", "restore_state", "validate_state"]),
    ("Sharding and several hosts", "Placing the tables on a device mesh and "
     "splitting the examples over processes.",
     ["state_shardings", "process_example_range"]),
]
OTHER_GROUP = ("Other public names", "Exported names that no group of "
               "`API_GROUPS` in `docs/conf.py` lists yet.")


class ApiGroupsError(Exception):
  pass


def api_groups(public=None):
  """The API page's groups, with every name of `public` in exactly one."""
  public = list(aalig_optax.__all__ if public is None else public)
  listed = [name for _, _, names in API_GROUPS for name in names]
  problems = []
  dupes = sorted({n for n in listed if listed.count(n) > 1})
  if dupes:
    problems.append(f"listed twice in API_GROUPS: {dupes}")
  stale = [n for n in listed if n not in public]
  if stale:
    problems.append(f"in API_GROUPS but not in aalig_optax.__all__: {stale}")
  if problems:
    raise ApiGroupsError("docs/conf.py: " + "; ".join(problems))
  groups = [(t, blurb, list(names)) for t, blurb, names in API_GROUPS]
  other = [n for n in public if n not in listed]
  if other:
    groups.append((*OTHER_GROUP, other))
  return groups


def api_markdown(public=None) -> str:
  """The generated part of api.md: a summary table, then one section a group."""
  groups = api_groups(public)
  every = [n for _, _, names in groups for n in names]
  out = ["", "```{eval-rst}", ".. currentmodule:: aalig_optax", "",
         ".. autosummary::", ""]
  out += [f"   {n}" for n in every]
  out += ["```", ""]
  for title, blurb, names in groups:
    out += [f"## {title}", "", blurb, "", "```{eval-rst}"]
    for name in names:
      obj = getattr(aalig_optax, name)
      kind = ("autoclass" if isinstance(obj, type)
              else "autofunction" if callable(obj) else "autodata")
      out += [f".. {kind}:: aalig_optax.{name}", ""]
    out += ["```", ""]
  return "\n".join(out)


def _add_api_sections(app, docname, source):
  if docname == "api":
    source[0] = source[0].rstrip("\n") + "\n" + api_markdown() + "\n"


# --------------------------------------------------------------------------
# Repository Markdown pulled into pages: links and images.

# Repository file -> the page it is pulled into. A link to one of these from
# any pulled file goes to that page.
PULLED_PAGES = {
    "README.md": "index",
    "docs/scaling.md": "scaling",
    "examples/README.md": "examples",
    "examples/RESULTS.md": "example-results",
    "benchmarks/results/README.md": "benchmarks",
    "benchmarks/results/scaling.md": "benchmark-scaling",
    "CHANGELOG.md": "changelog",
}
# Sections of README.md that live on another page than the index.
README_SECTIONS = {"#the-api": "usage", "#bad-input": "usage",
                   "#semantics-worth-knowing": "usage",
                   "#benchmarks": "usage", "#tests": "usage",
                   "#references": "usage"}

# [text](target) and ![alt](target); the target has no spaces or parentheses.
_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(([^()\s]+)\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_CODE = re.compile(r"^ *(```+|~~~+).*?^ *\1[ \t]*$|(`+)[^`]+?\2",
                   re.MULTILINE | re.DOTALL)


def rewrite_links(text: str, repo_path: str, parent_docname: str) -> str:
  """`text` of repository file `repo_path`, its relative links fixed for Sphinx.

  A link that leaves the repository or points at nothing is made a document
  reference that cannot resolve, so that MyST warns where it is included.
  """
  base = posixpath.dirname(repo_path)

  def fix(m):
    bang, label, target = m.groups()
    if _SCHEME.match(target) or target.startswith("#"):
      if target.startswith("#") and repo_path == "README.md":
        page = README_SECTIONS.get(target)
        if page and page != parent_docname:
          return f"{bang}[{label}]({page}.md{target})"
      return m.group(0)
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(base, path))
    on_disk = ROOT / resolved
    if resolved.startswith("../") or resolved == ".." or not on_disk.exists():
      # Left to MyST as a document reference that cannot resolve: it warns
      # (file and line) if the link lies in the part that is included.
      # (An image left as it is: Sphinx reports an unreadable image file.)
      if bang or path.endswith(".md"):
        return m.group(0)
      return f"{bang}[{label}](project:{target})"
    from_docs = posixpath.relpath(resolved, "docs")
    if bang:
      return f"![{label}]({from_docs})"
    page = PULLED_PAGES.get(resolved)
    if page is None and resolved.startswith("docs/") and resolved.endswith(
        ".md"):
      page = resolved[len("docs/"):-len(".md")]  # a page of this site
    if page is not None:
      return f"[{label}]({page}.md{'#' + anchor if anchor else ''})"
    if on_disk.is_dir():
      return label  # a folder: its name, in the text only
    return f"[{label}](path:{from_docs})"  # a download of the file

  # Code (fenced blocks, inline spans) is set aside so that nothing in it is
  # taken for a link.
  kept = []

  def keep(m):
    kept.append(m.group(0))
    return f"\x00{len(kept) - 1}\x00"

  text = _CODE.sub(keep, text)
  text = _LINK.sub(fix, text)
  return re.sub("\x00([0-9]+)\x00", lambda m: kept[int(m.group(1))], text)


def _fix_included(app, relative_path, parent_docname, content):
  repo_path = (DOCS / relative_path).resolve()
  try:
    rel = repo_path.relative_to(ROOT).as_posix()
  except ValueError:
    rel = None
  if rel is None or not rel.endswith(".md"):
    return
  content[0] = rewrite_links(content[0], rel, parent_docname)


def setup(app):
  app.connect("source-read", _add_api_sections)
  app.connect("include-read", _fix_included)
  return {"parallel_read_safe": True, "parallel_write_safe": True}


# Fail at import (before any page is read) if the API groups are stale.
api_groups()
