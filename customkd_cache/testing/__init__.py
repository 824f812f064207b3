"""Test support shipped with the package (as ``zarr.testing`` is): ``fakedata`` writes tiny datasets in
the real on-disk layouts (OfficeHome, DomainNet, CIFAR, ImageNet, Fashion-MNIST, image folders, list
files) for tests, benchmarks and smoke runs. Nothing in the pipeline imports it."""
