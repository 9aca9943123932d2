"""vsphere-proxy: back up vSphere VMs through a fleet of backup proxies (US 9563514 proxy assignment)."""

__version__ = "0.1.0"
