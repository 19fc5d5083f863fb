"""One module per ``featkd`` sub-command, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
