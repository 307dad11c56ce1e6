"""stap-exporter: run SystemTap scripts and serve their Prometheus output over HTTP."""

__version__ = "1.0.0"
