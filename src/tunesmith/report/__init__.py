"""Reports: HTML pages and plots made from plain data (dicts and lists); imports nothing above it."""
