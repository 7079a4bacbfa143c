"""pclitectl: a kubectl-style command line for pclited (flavors, warm pools and microVMs)."""
