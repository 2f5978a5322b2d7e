"""Test setup: 8 fake CPU devices (set before jax is imported), shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
