import sys

from lmaas.worker.main import main

sys.exit(main())
