"""The README's Python blocks run as written (8 simulated CPU devices)."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_quick_start_and_scaling_blocks():
  blocks = python_blocks()
  assert len(blocks) == 2
  assert "nnx.Optimizer" in blocks[0] and "state_shardings" in blocks[1]


def test_quick_start_block_trains():
  namespace = {}
  exec(compile(python_blocks()[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.key(0), (128, 784))
  y = jnp.arange(128) % 10
  losses = [float(namespace["train_step"](namespace["model"],
                                          namespace["optimizer"], x, y,
                                          jnp.arange(128) + 128 * k))
            for k in range(4)]
  assert losses[-1] < losses[0]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_scaling_block_splits_the_tables(capsys):
  exec(compile(python_blocks()[1], "README.md", "exec"), {})  # pylint: disable=exec-used
  assert "P('data',) (125000,)" in capsys.readouterr().out
