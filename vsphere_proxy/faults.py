"""Faults that end a whole job rather than one VM's attempt.

Core code cannot know vCenter's exceptions (it never imports `adapters`), yet an engine must tell "this VM's read
failed, try it elsewhere" from "nothing can go on": vCenter stopped answering, the repository is full. Adapters
and the repository raise subclasses of `JobFault`; an engine that sees one stops scheduling, fails the VMs left with
the fault's text as their reason and ends the job.
"""

from __future__ import annotations


class JobFault(Exception):
    """A fault after which no further attempt of the job can succeed; its message is the reason every VM left
    is reported with (one line)."""


class Unresponsive(JobFault):
    """A service the job needs (vCenter, its datastore HTTP endpoint, the Automation API) did not answer within
    its bound: "vCenter did not answer in N s"."""


class VmFault(Exception):
    """A fault that ends one VM for the whole job: it is not tried again in a later round (a `before_vm` hook
    refused it). Its message is the VM's reason."""
