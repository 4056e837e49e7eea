"""Multi-host AALIG: each process owns a range of example indices.

On a pod or a multi-node cluster every process (host) runs the same program.
Process p reads only its own examples, the global indices
``process_example_range(N)`` = ``[p*N//P, (p+1)*N//P)``, and feeds its local
devices batches of those *global* indices; JAX assembles the global batch
(``jax.make_array_from_process_local_data``). AALIG's tables are indexed by
global index and split over all devices along the example axis
(``state_shardings(..., table_axis="data")``), so no device holds the whole
table and every step writes each batch row into the right shard, wherever
that shard lives.

This script runs that program on one host, with the processes simulated:

* default: 4 real processes (``jax.distributed`` on 127.0.0.1, CPU
  collectives over gloo), 2 CPU devices each;
* ``--in-process``: one process with 8 CPU devices, the 4 "processes" being
  groups of 2 devices, each group fed only its process's rows.

Either way the result is checked against a plain single-device run on the
same global batches. Run from the repository root::

    python -m examples.multihost
    python -m examples.multihost --in-process
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys

NUM_EXAMPLES, DIM, GLOBAL_BATCH, STEPS = 4096, 8, 64, 30
STEPS_PER_EPOCH, EPOCHS_PER_SECTION = 8, 1  # a section end every 8 steps


def example_rows(indices):
  """The examples at these global indices, as a loader would read them.

  Generated from the index alone (a stand-in for a sharded data set on
  disk), so a process can materialise its own rows and no others.
  """
  import numpy as np
  idx = np.asarray(indices)
  x = np.stack([np.sin(0.37 * (idx + 1) * (k + 1)) for k in range(DIM)], -1)
  w_true = np.linspace(-1.0, 1.0, DIM)
  y = x @ w_true + 0.3 * np.cos(1.3 * idx)  # noise: no w interpolates
  return x.astype(np.float32), y.astype(np.float32)


def local_batch_indices(step, process, num_processes):
  """Process `process`'s share of the global batch at `step`: its own rows."""
  import numpy as np
  from aalig_optax import process_example_range
  mine = process_example_range(NUM_EXAMPLES, process, num_processes)
  rng = np.random.default_rng([step, process])
  return rng.choice(np.asarray(mine), GLOBAL_BATCH // num_processes,
                    replace=False).astype(np.int32)


def global_batch_indices(step, num_processes):
  import numpy as np
  return np.concatenate([local_batch_indices(step, p, num_processes)
                         for p in range(num_processes)])


def make_tx():
  from aalig_optax import aalig
  return aalig(0.5, NUM_EXAMPLES, STEPS_PER_EPOCH, EPOCHS_PER_SECTION)


def train_step(tx, params, state, x, y, idx):
  import jax
  import jax.numpy as jnp
  import optax

  def mean_loss(w):
    losses = 0.5 * (x @ w - y) ** 2
    return jnp.mean(losses), losses
  (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  updates, state = tx.update(grads, state, params, losses=losses, indices=idx)
  return optax.apply_updates(params, updates), state


def train_on_mesh(num_processes, make_global):
  """The multi-device program; `make_global` builds a global batch array."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from aalig_optax import state_shardings

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  tx = make_tx()
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(jnp.zeros(DIM), replicated)
  shardings = state_shardings(jax.eval_shape(tx.init, params), mesh,
                              table_axis="data")
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  step = jax.jit(functools.partial(train_step, tx), donate_argnums=(0, 1),
                 out_shardings=(replicated, shardings))
  batch = NamedSharding(mesh, P("data"))
  for t in range(STEPS):
    x, y, idx = make_global(t, batch)
    params, state = step(params, state, x, y, idx)
  return params, state


def reference(num_processes):
  """One device, the same global batches."""
  import jax
  import jax.numpy as jnp
  tx = make_tx()
  params = jnp.zeros(DIM)
  state = tx.init(params)
  step = jax.jit(functools.partial(train_step, tx))
  for t in range(STEPS):
    idx = global_batch_indices(t, num_processes)
    x, y = example_rows(idx)
    params, state = step(params, state, x, y, idx)
  return jax.device_get((params, state))


def summary(params, state):
  import numpy as np
  from aalig_optax import current_aovs
  core = state[0]
  return (f"w[:3]={np.round(np.asarray(params)[:3], 5).tolist()} "
          f"sections={int(core.num_sections)} "
          f"mean AOV={float(np.mean(current_aovs(core)[0])):.6f} "
          f"seen={int(np.sum(~np.isnan(core.last_loss)))}")


# ------------------------------------------------------ real processes
def worker(process_id, num_processes, port, devices_per_process):
  """One process of the job: what every host of a real pod would run."""
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={devices_per_process}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils
  from aalig_optax import process_example_range

  p, count = jax.process_index(), jax.process_count()
  mine = process_example_range(NUM_EXAMPLES)  # this process's examples

  def make_global(t, sharding):
    idx = local_batch_indices(t, p, count)  # global indices, all in `mine`
    assert idx.min() >= mine.start and idx.max() < mine.stop
    x, y = example_rows(idx)  # read only this process's rows
    return tuple(jax.make_array_from_process_local_data(sharding, a)
                 for a in (x, y, idx))

  params, state = train_on_mesh(count, make_global)
  rows = [(s.index[0].start, s.index[0].stop)
          for s in state[0].aov.addressable_shards]
  print(f"process {p}/{count}: loads examples [{mine.start}, {mine.stop}); "
        f"its devices hold table rows {rows}", flush=True)
  params, state = multihost_utils.process_allgather((params, state),
                                                    tiled=True)
  if p == 0:
    np.savez(os.environ["AALIG_MULTIHOST_OUT"],
             params=np.asarray(params),
             **{k: np.asarray(getattr(state[0], k))
                for k in ("aov", "aov_step", "last_loss", "num_sections")})
  jax.distributed.shutdown()


def launch(num_processes, devices_per_process):
  import tempfile
  import numpy as np
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = os.path.join(tempfile.mkdtemp(), "result.npz")
  env = dict(os.environ, AALIG_MULTIHOST_OUT=out)
  print(f"launching {num_processes} processes x {devices_per_process} CPU "
        f"devices on 127.0.0.1:{port}", flush=True)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "examples.multihost", "--worker", str(p),
       "--processes", str(num_processes), "--port", str(port),
       "--devices-per-process", str(devices_per_process)], env=env)
           for p in range(num_processes)]
  codes = [proc.wait(timeout=600) for proc in procs]
  if any(codes):
    raise SystemExit(f"a worker failed: exit codes {codes}")
  got = np.load(out)
  ref_params, ref_state = reference(num_processes)
  print("multi-process:", f"w[:3]={np.round(got['params'][:3], 5).tolist()} "
        f"sections={int(got['num_sections'])} "
        f"mean AOV={float(np.mean(got['aov'])):.6f}")
  print("one device:   ", summary(ref_params, ref_state))
  np.testing.assert_allclose(got["params"], ref_params, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["aov"], ref_state[0].aov, rtol=1e-4,
                             atol=1e-5)
  print("same params and tables as on one device")


# ----------------------------------------------- processes as device groups
def in_process(num_processes, devices_per_process):
  os.environ["XLA_FLAGS"] = (
      "--xla_force_host_platform_device_count="
      f"{num_processes * devices_per_process}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from aalig_optax import process_example_range

  groups = [jax.devices()[p * devices_per_process:
                          (p + 1) * devices_per_process]
            for p in range(num_processes)]
  for p, devs in enumerate(groups):
    r = process_example_range(NUM_EXAMPLES, p, num_processes)
    print(f"simulated process {p}: loads examples [{r.start}, {r.stop}) "
          f"for devices {[d.id for d in devs]}")

  def make_global(t, sharding):
    # What make_array_from_process_local_data does on a pod: each process's
    # rows go to that process's devices only.
    arrays = []
    per_process = [example_rows(local_batch_indices(t, p, num_processes))
                   + (local_batch_indices(t, p, num_processes),)
                   for p in range(num_processes)]
    for k in range(3):
      shards = []
      for p, devs in enumerate(groups):
        local = per_process[p][k]
        n = len(local) // len(devs)
        shards += [jax.device_put(local[i * n:(i + 1) * n], d)
                   for i, d in enumerate(devs)]
      shape = (GLOBAL_BATCH,) + per_process[0][k].shape[1:]
      arrays.append(jax.make_array_from_single_device_arrays(
          shape, sharding, shards))
    return tuple(arrays)

  params, state = train_on_mesh(num_processes, make_global)
  rows = sorted({(s.device.id, s.index[0].start, s.index[0].stop)
                 for s in state[0].aov.addressable_shards})
  print("table rows per device:", [(d, a, b) for d, a, b in rows][:3], "...")
  got = jax.device_get((params, state))
  ref = reference(num_processes)
  print("8 devices: ", summary(*got))
  print("one device:", summary(*ref))
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[1][0].aov, ref[1][0].aov, rtol=1e-4,
                             atol=1e-5)
  print("same params and tables as on one device")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=4)
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--in-process", action="store_true",
                      help="simulate the processes as device groups")
  parser.add_argument("--worker", type=int, default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if GLOBAL_BATCH % (args.processes * args.devices_per_process):
    raise SystemExit("the global batch must split evenly over the devices")
  if args.worker is not None:
    worker(args.worker, args.processes, args.port, args.devices_per_process)
  elif args.in_process:
    in_process(args.processes, args.devices_per_process)
  else:
    launch(args.processes, args.devices_per_process)


if __name__ == "__main__":
  main()
