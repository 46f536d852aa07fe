"""`podsettle serve`: a live dashboard of the store and the JSON API behind it (web/app.py), guarded
by a loopback-or-token policy (web/security.py); the MCP server mounts at `/mcp` of the same server."""
