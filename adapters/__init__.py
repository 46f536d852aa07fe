"""Everything that talks to the outside world: stores, escrow and compute gateways, processors, servers."""
