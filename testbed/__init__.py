"""vcsim testbed: launcher, topologies, deterministic disk images and the vsphere-proxy config they imply."""
