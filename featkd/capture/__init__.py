"""The capture layer: named intermediate tensors of unmodified models (module hooks and torch.fx nodes).

:mod:`featkd.capture.capture` (``CapturingModel``), :mod:`featkd.capture.layouts` (``:tokens`` / ``:nhwc``
suffixes), :mod:`featkd.capture.groups` (DFA's layer groups) and :mod:`featkd.capture.graph_tail` (the part of a
traced model after a point). Import from the submodules; this package imports nothing.
"""
