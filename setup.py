"""Packaging for stap-exporter."""

import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(HERE, "stapexporter_lib", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def requirements():
    """install_requires from requirements.txt, the one place the supported
    versions (gevent's tested range above all) are written down."""
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.strip() for line in f
                if line.strip() and not line.lstrip().startswith("#")]


def readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="stap-exporter",
    version=version(),
    description="Serve SystemTap scripts' Prometheus metrics over HTTP",
    long_description=readme(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.7",
    py_modules=["stapexporter"],
    packages=["stapexporter_lib"],
    install_requires=requirements(),
    entry_points={"console_scripts": ["stap-exporter = stapexporter:main"]},
    data_files=[
        ("share/man/man8", ["man/stap-exporter.8"]),
        # Examples as documentation only: nothing goes into the scripts
        # directory (/etc/stap-exporter, cli.default_scripts_dir), so no probe
        # runs that the administrator did not put there.
        ("share/doc/stap-exporter/examples", sorted(glob.glob("examples/*.stp"))),
        ("share/doc/stap-exporter/examples/bpf", sorted(glob.glob("examples/bpf/*.stp"))),
        # Service files, for packagers to move into place.
        ("share/stap-exporter/dist", ["dist/stap-exporter.service",
                                      "dist/stap-exporter.sysconfig",
                                      "dist/stap-exporter.init"]),
    ],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Monitoring",
        "Environment :: No Input/Output (Daemon)",
    ],
)
