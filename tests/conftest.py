"""Test set-up shared by every test module.

Eight fake CPU devices are configured here, before any test imports JAX's backend, so the sharding
tests can build (2, 2, 2), (8, 1, 1) and (1, 8, 1) meshes on a one-socket CPU machine. Code that
does not ask for a mesh still runs on device 0, exactly as with one device. On a GPU or TPU machine
the accelerator stays the default backend; the mesh tests take ``jax.devices("cpu")`` explicitly.
"""

import os

import jax

N_FAKE_CPU_DEVICES = 8

# The config option (JAX >= 0.4.34) must be set before the CPU backend starts; XLA_FLAGS is the
# older spelling and is honoured by subprocesses that inherit the environment.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", N_FAKE_CPU_DEVICES)
