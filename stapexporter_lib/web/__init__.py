"""The web side: HTTP server, routes, auth and web config, index page, self-metrics, discovery."""
