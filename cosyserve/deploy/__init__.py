"""Ways to run cosyserve beyond one process (Ray Serve)."""
