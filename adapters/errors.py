"""Errors raised by the vSphere adapters. Messages name the server and user, never the password."""

from vsphere_proxy.faults import Unresponsive


class VSphereError(Exception):
    """A vSphere call failed."""


class AuthError(VSphereError):
    """vCenter refused the credentials or the session, or the user lacks a privilege."""


class ConnectError(VSphereError):
    """vCenter could not be reached (refused connection, DNS, timeout or TLS failure)."""


class VCenterUnresponsive(ConnectError, Unresponsive):
    """vCenter accepted the connection (or had) and did not answer within the bound: "vCenter did not answer in
    N s". It ends the job (`vsphere_proxy.faults.JobFault`): no other call would fare better."""
