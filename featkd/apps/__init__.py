"""The applications built on the library: export, the demo job, the environment report, building zoo recipes."""
