"""stap-exporter: run SystemTap scripts and serve their Prometheus output over HTTP.

Owns the package version.  Must not import anything (``setup.py`` reads it).
"""

__version__ = "1.0.0"
