"""Worker of tests/test_train.py: the trainer's command line, after checking that JAX sees
the expected number of devices (XLA_FLAGS=--xla_force_host_platform_device_count=N).

  python tests/workers/train_on_devices.py N --config=... --workdir=...
"""
import sys

import jax

from paligemma import config
from paligemma import train

want = int(sys.argv.pop(1))
assert jax.device_count() == want, jax.devices()
config.run(train.main)
