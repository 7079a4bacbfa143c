"""One thin router per resource: parse, call a service, shape the answer."""
