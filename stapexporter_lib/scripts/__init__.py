"""The script side: catalog, sessions, processes, compile and load, output."""
