"""Settings and the database: what every other layer of pclited is built on."""
