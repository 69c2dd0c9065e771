"""The HTTP layer: schemas, routes and error mapping (thin; the work happens in the worker)."""
