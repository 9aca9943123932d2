"""Errors raised by the vSphere adapters. Messages name the server and user, never the password."""


class VSphereError(Exception):
    """A vSphere call failed."""


class AuthError(VSphereError):
    """vCenter refused the credentials or the session, or the user lacks a privilege."""


class ConnectError(VSphereError):
    """vCenter could not be reached (refused connection, DNS, timeout or TLS failure)."""
