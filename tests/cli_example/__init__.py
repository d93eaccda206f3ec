"""A tiny "user project" for the command-line tests: model factories and data factories that a TOML config
names as ``cli_example.models:make_mlp`` and ``cli_example.data:blobs`` (tests/test_cli_own_model.py)."""
