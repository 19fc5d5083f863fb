"""The capture layer: named intermediate tensors of unmodified models (module hooks and torch.fx nodes).

:mod:`featkd.capture.points` (the capture-point grammar: ``module``, ``module:input``, ``module[key]``,
``module[*]``), :mod:`featkd.capture.trace` (the scoped fx trace of each mode, node lookup, traceable
sub-modules), :mod:`featkd.capture.capture` (``CapturingModel``), :mod:`featkd.capture.listing` (every point
with its shape, ``featkd layers``), :mod:`featkd.capture.layouts` (``:tokens`` / ``:nhwc`` suffixes),
:mod:`featkd.capture.groups` (DFA's layer groups) and :mod:`featkd.capture.graph_tail` (the part of a traced
model after a point). Import from the submodules; this package imports nothing.
"""
