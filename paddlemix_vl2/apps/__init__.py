"""The command-line programs behind ``examples/*.py``, the console scripts and ``python -m paddlemix_vl2``.

Each module has ``build_parser(prog)``, ``parse_args(argv)``, ``main(args) -> exit code`` and ``cli(argv)``
(the console-script entry point). Importing a module does no work.
"""
