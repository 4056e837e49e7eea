"""What a checkpoint records beside its arrays, and how a tree is compared.

Each leaf's shape, dtype (or Python scalar type) and SHA-256, and the
:class:`AaligConfig` of every :class:`ScaleByAaligState` by its tree path,
so that damaged files and checkpoints of another schedule are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aalig_optax._state import AaligConfig
from aalig_optax._state import ScaleByAaligState
from aalig_optax._state import TABLE_FIELDS

# Written into the checkpoint before it is renamed into place: each leaf's
# shape, dtype and SHA-256, so that a missing or damaged chunk (which Zarr
# may read back as its fill value) cannot pass unnoticed, and each AALIG
# state's config, so that a checkpoint of another schedule is refused.
CHECKSUM_FILE = "aalig_checksums.json"


# Python scalars: the NumPy dtype they are hashed (and stored by Orbax) as.
PYTHON_SCALARS = {bool: "bool", int: "int", float: "float"}
_SCALAR_DTYPES = {"bool": np.dtype(np.bool_), "int": np.dtype(np.int64),
                  "float": np.dtype(np.float64)}
SCALAR_TYPES = {"bool": bool, "int": int, "float": float}
_SCALAR_KINDS = {"bool": np.bool_, "int": np.integer, "float": np.floating}

# AaligConfig fields that must be equal for a checkpoint to be restored;
# lower_bound may decrease (the stored AOVs still lie above the new bound).
_EQUAL_FIELDS = ("num_examples", "steps_per_epoch", "epochs_per_section",
                 "loss_estimate", "table_dtype")
_FIELD_TYPES = {"num_examples": int, "steps_per_epoch": int,
                "epochs_per_section": int, "loss_estimate": str,
                "table_dtype": str, "lower_bound": (int, float, type(None))}


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Any) -> str:
  return "/".join(_key_str(k) for k in path)


def flat(tree: Any) -> dict[str, Any]:
  """{'a/0/aov': leaf} for every non-None leaf; NamedTuples by field name."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(path): leaf for path, leaf in leaves}


def configs(tree: Any) -> dict[str, Optional[AaligConfig]]:
  """{path: config} of every ScaleByAaligState in `tree`."""
  nodes, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, ScaleByAaligState))
  return {path_str(path): node.config for path, node in nodes
          if isinstance(node, ScaleByAaligState)}


class _Spec(NamedTuple):
  """A leaf's shape and dtype; `python` names a Python scalar's type."""
  shape: tuple[int, ...]
  dtype: np.dtype
  python: Optional[str] = None


def spec(x: Any) -> _Spec:
  kind = PYTHON_SCALARS.get(type(x))
  if kind is None and type(x).__name__ == "ScalarMetadata":
    # Orbax's metadata of a saved Python scalar (array metadata otherwise).
    dtype = np.dtype(x.dtype)
    kind = next(k for k, v in _SCALAR_KINDS.items()
                if jnp.issubdtype(dtype, v))
  if kind is not None:
    return _Spec((), _SCALAR_DTYPES[kind], kind)
  if not hasattr(x, "dtype"):
    raise TypeError(
        f"a {type(x).__name__} is neither an array nor a Python bool, int or "
        "float")
  return _Spec(tuple(np.shape(x)), np.dtype(x.dtype))


def _fits(got: _Spec, want: _Spec) -> bool:
  if got.python is not None:
    # A Python scalar restores as itself: into a Python scalar of its type,
    # or a shape-() leaf of its kind (what jax.eval_shape makes of it).
    if want.python is not None:
      return got.python == want.python
    return want.shape == () and jnp.issubdtype(want.dtype,
                                               _SCALAR_KINDS[got.python])
  # An array is never turned into a Python scalar, nor cast.
  return want.python is None and got[:2] == want[:2]


def _spec_str(s: _Spec) -> str:
  if s.python is not None:
    return f"a Python {s.python}"
  return f"shape {s.shape} dtype {s.dtype}"


def _describe(path: str, got: _Spec, want: _Spec, what: str) -> str:
  has = "holds" if got.python is not None else "has"
  msg = f"leaf '{path}': {what} {has} {_spec_str(got)}, expected " + (
      _spec_str(want))
  name = path.rsplit("/", 1)[-1]
  if (name in TABLE_FIELDS and got.python is None and want.python is None
      and got.shape != want.shape and len(got.shape) == 1
      and len(want.shape) == 1):
    msg += (f" (the {what} holds tables for {got.shape[0]} examples, the "
            f"optimiser was built with num_examples={want.shape[0]})")
  return msg


def compare(found: dict[str, _Spec], expected: dict[str, _Spec], what: str):
  problems = []
  for path in sorted(expected.keys() - found.keys()):
    problems.append(f"leaf '{path}' is missing from the {what}")
  for path in sorted(found.keys() - expected.keys()):
    problems.append(f"leaf '{path}' is in the {what} but not expected")
  for path in sorted(found.keys() & expected.keys()):
    if not _fits(found[path], expected[path]):
      problems.append(_describe(path, found[path], expected[path], what))
  old = {p.rsplit("/", 1)[0] for p in found.keys() - expected.keys()
         if p.rsplit("/", 1)[-1] in ("count", "num_sections")}
  if any(p.rsplit("/", 1)[0] in old and p.endswith("/counters")
         for p in expected.keys() - found.keys()):
    problems.append(
        f"the {what} holds an AALIG state of aalig-optax 0.1.0's layout, with "
        "one leaf per scalar; the state now packs them into `counters` and "
        "`stats` (docs/algorithm.md, \"The state\"): restore it with the "
        "version that wrote it, or rebuild the state from its leaves with "
        "aalig_optax.ScaleByAaligState.from_fields")
  return problems


def specs(tree: Any, what: str) -> dict[str, _Spec]:
  specs = {}
  for path, x in flat(tree).items():
    try:
      specs[path] = spec(x)
    except TypeError as e:
      raise TypeError(f"leaf '{path}' of the {what}: {e}.") from None
  return specs


def validate_state(state: Any, like: Any) -> None:
  """Raises a ValueError unless `state` matches `like` leaf by leaf.

  Checks the tree structure and each leaf's shape and dtype, so that, e.g., a
  state built for another `num_examples`, `table_dtype` or `loss_estimate`
  is reported rather than used. A Python scalar in `state` matches a Python
  scalar of its type in `like`, or a shape-() leaf of its kind (bool,
  integer, floating); an array never matches a Python scalar.

  Args:
    state: a pytree of arrays, e.g. a restored optimiser state.
    like: the expected pytree: arrays or ``jax.ShapeDtypeStruct`` leaves, e.g.
      ``jax.eval_shape(opt.init, params)``.

  Raises:
    ValueError: naming every mismatched leaf by its path.
    TypeError: when a leaf is neither an array nor a Python scalar.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from aalig_optax import aalig, validate_state
    >>> state = aalig(0.1, 10, 1, 1).init(jnp.zeros(2))
    >>> like = jax.eval_shape(aalig(0.1, 12, 1, 1).init, jnp.zeros(2))
    >>> try:
    ...   validate_state(state, like)
    ... except ValueError as e:
    ...   print(str(e).splitlines()[1].split(":")[0].strip())
    leaf '0/aov'
  """
  problems = compare(specs(state, "state"), specs(like, "expected state"),
                      "state")
  if problems:
    raise ValueError("The state does not match the expected structure:\n  "
                     + "\n  ".join(problems))


def digest(x: Any, spec: _Spec) -> str | None:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None  # Multi-process arrays: Orbax's own checks only.
  if spec.python is not None:
    # OverflowError for an int beyond int64, which Orbax cannot store.
    arr = np.asarray(x, _SCALAR_DTYPES[spec.python])
  else:
    arr = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return hashlib.sha256(arr.tobytes()).hexdigest()


def manifest(state: Any) -> dict[str, Any]:
  leaves = {}
  for path, x in flat(state).items():
    try:
      s = spec(x)
      entry = {"shape": list(s.shape), "dtype": str(s.dtype),
               "sha256": digest(x, s)}
    except (TypeError, OverflowError) as e:
      raise TypeError(
          f"save_state cannot save leaf '{path}' ({e}): leaves must be "
          "arrays or Python bool, int (within int64) or float scalars."
      ) from None
    if s.python is not None:
      entry["python"] = s.python
    leaves[path] = entry
  return {"leaves": leaves,
          "configs": {path: None if c is None else dataclasses.asdict(c)
                      for path, c in configs(state).items()}}


def parse_manifest(raw: Any) -> tuple[dict[str, Any], Optional[dict]]:
  """(checksums, configs) of a loaded checksum file; ValueError if malformed.

  `configs` is None for a file written before configs were recorded.
  """
  if not isinstance(raw, dict) or not isinstance(raw.get("leaves"), dict):
    raise ValueError('not an object with a "leaves" object')
  for path, entry in raw["leaves"].items():
    if not isinstance(entry, dict) or "sha256" not in entry or not (
        entry["sha256"] is None or isinstance(entry["sha256"], str)):
      raise ValueError(f"bad entry for leaf {path!r}: {entry!r}")
  configs = raw.get("configs")
  if configs is not None:
    if not isinstance(configs, dict):
      raise ValueError(f'"configs" is not an object: {configs!r}')
    for path, config in configs.items():
      if config is None:
        continue
      if not isinstance(config, dict) or any(
          isinstance(config[f], bool) or not isinstance(config[f], t)
          for f, t in _FIELD_TYPES.items() if f in config):
        raise ValueError(f"bad config for {path!r}: {config!r}")
  return raw["leaves"], configs


def schedule_problems(stored: Optional[dict[str, Any]],
                       expected: dict[str, Optional[AaligConfig]]):
  """(problems, paths whose schedule the checkpoint does not record)."""
  problems, unchecked = [], []
  for path, want in sorted(expected.items()):
    if want is None:
      continue
    have = None if stored is None else stored.get(path)
    if have is None:
      unchecked.append(path)
      continue
    # Fields a checkpoint does not record (a newer AaligConfig) are skipped.
    diffs = [f"{f}={have[f]!r} (checkpoint) vs {getattr(want, f)!r} "
             "(expected)" for f in _EQUAL_FIELDS
             if f in have and have[f] != getattr(want, f)]
    old, new = have.get("lower_bound"), want.lower_bound
    # None: injected as a JAX array, unknown until run time.
    if old is not None and new is not None and new > old:
      diffs.append(f"lower_bound={old!r} (checkpoint) vs {new!r} (expected):"
                   " the stored AOVs may lie below the new bound")
    if diffs:
      problems.append(
          f"the AALIG state at '{path}' was saved for another schedule; its "
          "counters and AOVs would be read against the wrong sections: "
          + "; ".join(diffs))
  return problems, unchecked
