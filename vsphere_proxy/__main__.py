import sys

from vsphere_proxy.cli import main

sys.exit(main())
