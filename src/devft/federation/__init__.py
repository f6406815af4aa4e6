"""Federation on Flower (Message API): ServerApp, ClientApp, strategy, grids and runners.

The only package that imports `flwr`. The same ServerApp/ClientApp run on the in-process grid
(fast one-machine default), Flower's Ray simulation runtime, and its deployment runtime.
"""
