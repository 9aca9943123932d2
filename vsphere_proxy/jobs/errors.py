"""How a job fails before or around its rounds, in one line that names the field or the value at fault.

`BadJob`: what was asked cannot be done as asked (the selection matches no VM, a job to resume that is not
resumable, an engine not configured): nothing was done. `JobFailed`: the job could not run or be recorded
(the catalog or the ledger unreachable). The command line maps them to exit codes 2 and 4.
"""

from __future__ import annotations


class JobError(Exception):
    """A job's failure, phrased for the admin."""


class BadJob(JobError):
    """The job as asked is wrong; nothing was done."""


class JobFailed(JobError):
    """The job could not go on (a service it needs failed)."""
