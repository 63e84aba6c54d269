"""The worker process: the composition root of one model replica (torch lives here and below).

``python -m lmaas.worker SPEC_FILE`` loads the model the spec names and serves it over ZeroMQ.
"""
