"""Dataset loaders: embedded digits, IDX files (MNIST, Fashion-MNIST), text corpora."""
