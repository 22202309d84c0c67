"""parsyn's server: the engine (one thread owns the model), jobs, fork store and the HTTP API."""
