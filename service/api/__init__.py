"""HTTP layer: middleware (auth, body limits), problem details, thin routes."""
