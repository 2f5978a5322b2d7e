"""Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60k train / 10k test, 28x28x1, 10 classes."""

from arch_zoo.data.builders.fashion_mnist_debian.fashion_mnist_debian_dataset_builder import Builder

__all__ = ["Builder"]
