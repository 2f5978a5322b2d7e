"""Test setup: XLA flags (set before jax is imported), shared fixtures."""

import os

# 8 fake CPU devices for the sharding tests. Backend optimisation level 0: the tests' models are
# tiny, so LLVM's optimisation is most of their compile time and buys no speed worth having
# (three train-and-resume tests: 80 s at the default level, 61 s at 0). Flags already in
# XLA_FLAGS win.
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_given] + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _given]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from arch_zoo import data as data_lib  # noqa: E402


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def austen_data_dir():
  """The prepared Austen dataset; `make test` prepares it before running pytest."""
  data_dir = data_lib.default_data_dir()
  if not data_lib.is_prepared("austen", data_dir):
    pytest.fail("The austen dataset is not prepared: run `make data` (or `python -m "
                "arch_zoo.data.prepare austen`) before the tests.")
  return data_dir


@pytest.fixture(scope="session")
def fashion_mnist_data_dir():
  """The prepared Fashion-MNIST dataset; `make test` prepares it before running pytest."""
  data_dir = data_lib.default_data_dir()
  if not data_lib.is_prepared("fashion_mnist_debian", data_dir):
    pytest.fail("The fashion_mnist_debian dataset is not prepared: run `make data` (or `python -m "
                "arch_zoo.data.prepare fashion_mnist_debian`) before the tests.")
  return data_dir
