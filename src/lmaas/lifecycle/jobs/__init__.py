"""Training, compression and conversion jobs: the torch side of the model lifecycle.

Each module is a program run in its own process (``python -m lmaas.lifecycle.jobs.train ...``),
started by ``lmaas train`` / ``lmaas compress`` / ``lmaas convert``. The CLI and the gateway
never import this package (import-linter forbids torch in ``lmaas.cli`` and ``lmaas.api``
through any chain), so only the job's process pays for torch, and a crash or Ctrl-C in a job
cannot take the CLI or a server down. A job registers its result through the registry as its
very last step, with Ctrl-C deferred for that step, so a cancelled job leaves no version behind.
"""
