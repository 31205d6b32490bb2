"""Inference backends. A backend runs one model on a batch; the runner and the
executor drive any of them through :class:`engine.backends.base.Backend`."""
