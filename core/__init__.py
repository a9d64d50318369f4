"""Everything that is not UI: config, schemas, errors, providers and the service facade."""
