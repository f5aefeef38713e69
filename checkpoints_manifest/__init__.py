"""The built-in run manifests (``*.yaml``), installed as the data package ``circuits_manifests``
(see ``[tool.setuptools]`` in pyproject.toml); ``circuits.manifest`` finds them there."""
