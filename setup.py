"""The data files of stap-exporter's distribution, which pyproject.toml (where
everything else is declared) cannot list."""

import glob

from setuptools import setup

setup(
    data_files=[
        ("share/man/man8", ["man/stap-exporter.8"]),
        # Examples as documentation only: nothing goes into the scripts
        # directory (/etc/stap-exporter, cli.default_scripts_dir), so no probe
        # runs that the administrator did not put there.
        ("share/doc/stap-exporter/examples", sorted(glob.glob("examples/*.stp"))),
        ("share/doc/stap-exporter/examples/bpf", sorted(glob.glob("examples/bpf/*.stp"))),
        # Service files, for packagers to move into place.
        ("share/stap-exporter/dist", sorted(glob.glob("dist/stap-exporter.*"))),
    ],
)
