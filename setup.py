"""Packages: the library found by discovery, plus its command layer, which lives in ``commands/`` and is
installed as ``surgeon.commands`` (``package-dir`` in pyproject.toml; discovery cannot see a package
whose folder is named differently). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["surgeon", "surgeon.*"]), "surgeon.commands"])
