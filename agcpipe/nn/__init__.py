"""Neural-network building blocks in PyTorch Geometric style (pooling layers, readouts, ...).

Import from the submodules, e.g. ``from agcpipe.nn.pooling import DMoNPooling``; this package file stays
empty so that importing one submodule does not import the others.
"""
